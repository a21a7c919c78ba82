// A minimal stand-in for TFLM's tensorflow/lite/micro/micro_mutable_op_resolver.h, used by the tests
// to compile and run generated resolver headers where the real TFLM sources are not installed (the
// tflite-micro wheel ships no headers). It mirrors the API the generated code calls: the class
// template, its Add*() methods (names as declared by TFLM), TfLiteStatus, and the failure the real
// resolver reports when more ops are added than its template argument allows.
#ifndef TFCOMPRESS_TEST_MICRO_MUTABLE_OP_RESOLVER_STUB_H_
#define TFCOMPRESS_TEST_MICRO_MUTABLE_OP_RESOLVER_STUB_H_

#include <cstring>

typedef enum TfLiteStatus { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;

namespace tflite {

template <unsigned int tOpCount>
class MicroMutableOpResolver {
 public:
  TfLiteStatus AddAbs() { return Register("AddAbs"); }
  TfLiteStatus AddAdd() { return Register("AddAdd"); }
  TfLiteStatus AddAddN() { return Register("AddAddN"); }
  TfLiteStatus AddArgMax() { return Register("AddArgMax"); }
  TfLiteStatus AddArgMin() { return Register("AddArgMin"); }
  TfLiteStatus AddAssignVariable() { return Register("AddAssignVariable"); }
  TfLiteStatus AddAveragePool2D() { return Register("AddAveragePool2D"); }
  TfLiteStatus AddBatchMatMul() { return Register("AddBatchMatMul"); }
  TfLiteStatus AddBatchToSpaceNd() { return Register("AddBatchToSpaceNd"); }
  TfLiteStatus AddBroadcastArgs() { return Register("AddBroadcastArgs"); }
  TfLiteStatus AddBroadcastTo() { return Register("AddBroadcastTo"); }
  TfLiteStatus AddCallOnce() { return Register("AddCallOnce"); }
  TfLiteStatus AddCast() { return Register("AddCast"); }
  TfLiteStatus AddCeil() { return Register("AddCeil"); }
  TfLiteStatus AddConcatenation() { return Register("AddConcatenation"); }
  TfLiteStatus AddConv2D() { return Register("AddConv2D"); }
  TfLiteStatus AddCos() { return Register("AddCos"); }
  TfLiteStatus AddCumSum() { return Register("AddCumSum"); }
  TfLiteStatus AddDecode() { return Register("AddDecode"); }
  TfLiteStatus AddDepthToSpace() { return Register("AddDepthToSpace"); }
  TfLiteStatus AddDepthwiseConv2D() { return Register("AddDepthwiseConv2D"); }
  TfLiteStatus AddDequantize() { return Register("AddDequantize"); }
  TfLiteStatus AddDetectionPostprocess() { return Register("AddDetectionPostprocess"); }
  TfLiteStatus AddDiv() { return Register("AddDiv"); }
  TfLiteStatus AddElu() { return Register("AddElu"); }
  TfLiteStatus AddEmbeddingLookup() { return Register("AddEmbeddingLookup"); }
  TfLiteStatus AddEqual() { return Register("AddEqual"); }
  TfLiteStatus AddExp() { return Register("AddExp"); }
  TfLiteStatus AddExpandDims() { return Register("AddExpandDims"); }
  TfLiteStatus AddFill() { return Register("AddFill"); }
  TfLiteStatus AddFloor() { return Register("AddFloor"); }
  TfLiteStatus AddFloorDiv() { return Register("AddFloorDiv"); }
  TfLiteStatus AddFloorMod() { return Register("AddFloorMod"); }
  TfLiteStatus AddFullyConnected() { return Register("AddFullyConnected"); }
  TfLiteStatus AddGather() { return Register("AddGather"); }
  TfLiteStatus AddGatherNd() { return Register("AddGatherNd"); }
  TfLiteStatus AddGreater() { return Register("AddGreater"); }
  TfLiteStatus AddGreaterEqual() { return Register("AddGreaterEqual"); }
  TfLiteStatus AddHardSwish() { return Register("AddHardSwish"); }
  TfLiteStatus AddIf() { return Register("AddIf"); }
  TfLiteStatus AddL2Normalization() { return Register("AddL2Normalization"); }
  TfLiteStatus AddL2Pool2D() { return Register("AddL2Pool2D"); }
  TfLiteStatus AddLeakyRelu() { return Register("AddLeakyRelu"); }
  TfLiteStatus AddLess() { return Register("AddLess"); }
  TfLiteStatus AddLessEqual() { return Register("AddLessEqual"); }
  TfLiteStatus AddLog() { return Register("AddLog"); }
  TfLiteStatus AddLogSoftmax() { return Register("AddLogSoftmax"); }
  TfLiteStatus AddLogicalAnd() { return Register("AddLogicalAnd"); }
  TfLiteStatus AddLogicalNot() { return Register("AddLogicalNot"); }
  TfLiteStatus AddLogicalOr() { return Register("AddLogicalOr"); }
  TfLiteStatus AddLogistic() { return Register("AddLogistic"); }
  TfLiteStatus AddMaxPool2D() { return Register("AddMaxPool2D"); }
  TfLiteStatus AddMaximum() { return Register("AddMaximum"); }
  TfLiteStatus AddMean() { return Register("AddMean"); }
  TfLiteStatus AddMinimum() { return Register("AddMinimum"); }
  TfLiteStatus AddMirrorPad() { return Register("AddMirrorPad"); }
  TfLiteStatus AddMul() { return Register("AddMul"); }
  TfLiteStatus AddNeg() { return Register("AddNeg"); }
  TfLiteStatus AddNotEqual() { return Register("AddNotEqual"); }
  TfLiteStatus AddPack() { return Register("AddPack"); }
  TfLiteStatus AddPad() { return Register("AddPad"); }
  TfLiteStatus AddPadV2() { return Register("AddPadV2"); }
  TfLiteStatus AddPrelu() { return Register("AddPrelu"); }
  TfLiteStatus AddQuantize() { return Register("AddQuantize"); }
  TfLiteStatus AddReadVariable() { return Register("AddReadVariable"); }
  TfLiteStatus AddReduceMax() { return Register("AddReduceMax"); }
  TfLiteStatus AddReduceMin() { return Register("AddReduceMin"); }
  TfLiteStatus AddRelu() { return Register("AddRelu"); }
  TfLiteStatus AddRelu6() { return Register("AddRelu6"); }
  TfLiteStatus AddReshape() { return Register("AddReshape"); }
  TfLiteStatus AddResizeBilinear() { return Register("AddResizeBilinear"); }
  TfLiteStatus AddResizeNearestNeighbor() { return Register("AddResizeNearestNeighbor"); }
  TfLiteStatus AddReverseV2() { return Register("AddReverseV2"); }
  TfLiteStatus AddRound() { return Register("AddRound"); }
  TfLiteStatus AddRsqrt() { return Register("AddRsqrt"); }
  TfLiteStatus AddSelectV2() { return Register("AddSelectV2"); }
  TfLiteStatus AddShape() { return Register("AddShape"); }
  TfLiteStatus AddSin() { return Register("AddSin"); }
  TfLiteStatus AddSlice() { return Register("AddSlice"); }
  TfLiteStatus AddSoftmax() { return Register("AddSoftmax"); }
  TfLiteStatus AddSpaceToBatchNd() { return Register("AddSpaceToBatchNd"); }
  TfLiteStatus AddSpaceToDepth() { return Register("AddSpaceToDepth"); }
  TfLiteStatus AddSplit() { return Register("AddSplit"); }
  TfLiteStatus AddSplitV() { return Register("AddSplitV"); }
  TfLiteStatus AddSqrt() { return Register("AddSqrt"); }
  TfLiteStatus AddSquare() { return Register("AddSquare"); }
  TfLiteStatus AddSquaredDifference() { return Register("AddSquaredDifference"); }
  TfLiteStatus AddSqueeze() { return Register("AddSqueeze"); }
  TfLiteStatus AddStridedSlice() { return Register("AddStridedSlice"); }
  TfLiteStatus AddSub() { return Register("AddSub"); }
  TfLiteStatus AddSum() { return Register("AddSum"); }
  TfLiteStatus AddSvdf() { return Register("AddSvdf"); }
  TfLiteStatus AddTanh() { return Register("AddTanh"); }
  TfLiteStatus AddTranspose() { return Register("AddTranspose"); }
  TfLiteStatus AddTransposeConv() { return Register("AddTransposeConv"); }
  TfLiteStatus AddUnidirectionalSequenceLSTM() { return Register("AddUnidirectionalSequenceLSTM"); }
  TfLiteStatus AddUnpack() { return Register("AddUnpack"); }
  TfLiteStatus AddVarHandle() { return Register("AddVarHandle"); }
  TfLiteStatus AddWhile() { return Register("AddWhile"); }
  TfLiteStatus AddZerosLike() { return Register("AddZerosLike"); }

  unsigned int registered() const { return registered_; }

 private:
  TfLiteStatus Register(const char* name) {
    for (unsigned int i = 0; i < registered_; ++i) {
      if (std::strcmp(names_[i], name) == 0) return kTfLiteError;  // TFLM refuses duplicates
    }
    if (registered_ >= tOpCount) return kTfLiteError;  // resolver too small
    names_[registered_++] = name;
    return kTfLiteOk;
  }

  const char* names_[tOpCount] = {};
  unsigned int registered_ = 0;
};

}  // namespace tflite

#endif  // TFCOMPRESS_TEST_MICRO_MUTABLE_OP_RESOLVER_STUB_H_
