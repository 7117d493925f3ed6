// What both IPluginV3 plugins share: logging through TensorRT's logger finder, attribute
// (de)serialisation as PluginFields, the optional-input map, and one base class that wires the
// Core / Build / Runtime capability interfaces to a single object.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch_types.h"

namespace shadowllm {
namespace trt {

constexpr const char* kNamespace = "shadowllm";  // the ONNX nodes' plugin_namespace
constexpr const char* kVersion = "1";            // and plugin_version

// Set by TensorRT through the library's setLoggerFinder; messages go nowhere until then.
void SetLoggerFinder(nvinfer1::ILoggerFinder* finder);
void Log(nvinfer1::ILogger::Severity severity, const std::string& message);

// Reads node attributes the ONNX parser passed as PluginFields (ints may arrive as any int width).
class FieldReader {
 public:
  explicit FieldReader(const nvinfer1::PluginFieldCollection* fc) : fc_(fc) {}
  bool Has(const char* name) const { return Find(name) != nullptr; }
  int64_t Int(const char* name) const;
  float Float(const char* name) const;
  std::string String(const char* name) const;

 private:
  const nvinfer1::PluginField* Find(const char* name) const;
  const nvinfer1::PluginFieldCollection* fc_;
};

// Owns the values behind a PluginFieldCollection that getFieldsToSerialize hands out.
class FieldWriter {
 public:
  void Int(const char* name, int32_t v);
  void Float(const char* name, float v);
  void String(const char* name, const std::string& v);
  const nvinfer1::PluginFieldCollection* Collection();

 private:
  std::vector<std::unique_ptr<char[]>> storage_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
  void Add(const char* name, const void* data, size_t bytes, nvinfer1::PluginFieldType type, int32_t length);
};

// The op contract lists optional inputs (biases, w_gate, cos/sin) that a model may leave empty.
// TensorRT passes only the inputs a node has, so `shadowllm build --target tensorrt` drops empty
// ones and records which optional slots are present in the node attribute `optional_inputs`
// (bit i = i-th optional slot). Without the attribute every input must be present.
class InputMap {
 public:
  InputMap(int32_t slots, std::vector<int32_t> optional_slots, int64_t present_bits);
  int32_t Index(int32_t slot) const { return index_[slot]; }  // -1 when absent
  // The buffer of contract slot `slot` among TensorRT's inputs (null when absent).
  const void* Get(const void* const* inputs, int32_t slot) const {
    return index_[slot] < 0 ? nullptr : inputs[index_[slot]];
  }
  int32_t Count() const { return count_; }
  int64_t Bits() const { return bits_; }

 private:
  std::vector<int32_t> index_;
  int32_t count_ = 0;
  int64_t bits_;
};

// Checks runtime dims against an expected shape (-1: any extent, recorded into `bound` when given):
// Expect(d, {B, S, D}, "x") etc. Returns "" or "x is [2,3], expected [2,3,64]".
std::string ExpectDims(const nvinfer1::Dims& dims, const std::vector<int64_t>& want, const char* name);
std::string DimsText(const nvinfer1::Dims& dims);

// IPluginV3 with its three capability interfaces on one object, as TensorRT's own plugins do.
class SparsePluginBase : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime {
 public:
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }
  int32_t getOutputDataTypes(nvinfer1::DataType* outputs, int32_t nb_outputs, const nvinfer1::DataType* inputs,
                             int32_t nb_inputs) const noexcept override;
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc*, int32_t, const nvinfer1::DynamicPluginTensorDesc*,
                          int32_t) noexcept override {
    return 0;
  }
  // The runtime shapes, checked before any enqueue with them: a mismatch (a cache of another kv-head
  // count, a mask shorter than the new tokens, weights of another width) is one error on TensorRT's
  // logger and a failed call, never a kernel reading past a buffer.
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc*,
                        int32_t) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }

 protected:
  // Format check shared by both ops: linear layout; float slots all of x's type (fp32, fp16 or bf16).
  enum class SlotKind { kFloat, kMask, kInt64 };
  // What is wrong with these runtime input shapes ("" when they hold), per op.
  virtual std::string ShapeError(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs) const = 0;
  bool SupportsSlot(SlotKind kind, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t pos) const;
  // The kernels' storage type: x's (every float tensor of a node has the same type).
  static cuda::DType StorageType(const nvinfer1::PluginTensorDesc* input_desc) {
    switch (input_desc[0].type) {
      case nvinfer1::DataType::kHALF: return cuda::DType::kFloat16;
      case nvinfer1::DataType::kBF16: return cuda::DType::kBFloat16;
      default: return cuda::DType::kFloat32;
    }
  }
  // enqueue's return: 0, or -1 with the CUDA error on TensorRT's log.
  int32_t LaunchStatus(cudaError_t err) const;
  FieldWriter fields_;
};

}  // namespace trt
}  // namespace shadowllm
