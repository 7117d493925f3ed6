#include "plugin_utils.h"

#include <atomic>

namespace shadowllm {
namespace trt {

using nvinfer1::PluginFieldType;

namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};
}

void SetLoggerFinder(nvinfer1::ILoggerFinder* finder) { g_finder.store(finder); }

void Log(nvinfer1::ILogger::Severity severity, const std::string& message) {
  nvinfer1::ILoggerFinder* finder = g_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger) logger->log(severity, ("[shadowllm] " + message).c_str());
}

const nvinfer1::PluginField* FieldReader::Find(const char* name) const {
  if (fc_ == nullptr) return nullptr;
  for (int32_t i = 0; i < fc_->nbFields; ++i)
    if (fc_->fields[i].name && std::strcmp(fc_->fields[i].name, name) == 0) return &fc_->fields[i];
  return nullptr;
}

int64_t FieldReader::Int(const char* name) const {
  const nvinfer1::PluginField* f = Find(name);
  if (f == nullptr || f->data == nullptr || f->length < 1) throw std::invalid_argument(std::string("missing attribute ") + name);
  switch (f->type) {
    case PluginFieldType::kINT8: return *static_cast<const int8_t*>(f->data);
    case PluginFieldType::kINT16: return *static_cast<const int16_t*>(f->data);
    case PluginFieldType::kINT32: return *static_cast<const int32_t*>(f->data);
    case PluginFieldType::kINT64: return *static_cast<const int64_t*>(f->data);
    default: throw std::invalid_argument(std::string("attribute ") + name + " is not an integer");
  }
}

float FieldReader::Float(const char* name) const {
  const nvinfer1::PluginField* f = Find(name);
  if (f == nullptr || f->data == nullptr || f->length < 1) throw std::invalid_argument(std::string("missing attribute ") + name);
  switch (f->type) {
    case PluginFieldType::kFLOAT32: return *static_cast<const float*>(f->data);
    case PluginFieldType::kFLOAT64: return static_cast<float>(*static_cast<const double*>(f->data));
    default: throw std::invalid_argument(std::string("attribute ") + name + " is not a float");
  }
}

std::string FieldReader::String(const char* name) const {
  const nvinfer1::PluginField* f = Find(name);
  if (f == nullptr || f->data == nullptr) throw std::invalid_argument(std::string("missing attribute ") + name);
  if (f->type != PluginFieldType::kCHAR) throw std::invalid_argument(std::string("attribute ") + name + " is not a string");
  const char* s = static_cast<const char*>(f->data);
  return std::string(s, strnlen(s, static_cast<size_t>(f->length)));
}

void FieldWriter::Add(const char* name, const void* data, size_t bytes, PluginFieldType type, int32_t length) {
  storage_.emplace_back(new char[bytes]);
  std::memcpy(storage_.back().get(), data, bytes);
  fields_.emplace_back(name, storage_.back().get(), type, length);
}

void FieldWriter::Int(const char* name, int32_t v) { Add(name, &v, sizeof v, PluginFieldType::kINT32, 1); }
void FieldWriter::Float(const char* name, float v) { Add(name, &v, sizeof v, PluginFieldType::kFLOAT32, 1); }
void FieldWriter::String(const char* name, const std::string& v) {
  Add(name, v.c_str(), v.size() + 1, PluginFieldType::kCHAR, static_cast<int32_t>(v.size() + 1));
}

const nvinfer1::PluginFieldCollection* FieldWriter::Collection() {
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
  return &collection_;
}

InputMap::InputMap(int32_t slots, std::vector<int32_t> optional_slots, int64_t present_bits)
    : index_(static_cast<size_t>(slots), -1), bits_(present_bits) {
  for (int32_t slot = 0; slot < slots; ++slot) {
    bool present = true;
    for (size_t i = 0; i < optional_slots.size(); ++i)
      if (optional_slots[i] == slot) present = present_bits < 0 || ((present_bits >> i) & 1);
    if (present) index_[static_cast<size_t>(slot)] = count_++;
  }
}

nvinfer1::IPluginCapability* SparsePluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

int32_t SparsePluginBase::getOutputDataTypes(nvinfer1::DataType* outputs, int32_t nb_outputs,
                                             const nvinfer1::DataType* inputs, int32_t nb_inputs) const noexcept {
  if (nb_inputs < 1) return -1;
  for (int32_t i = 0; i < nb_outputs; ++i) outputs[i] = inputs[0];  // y and the caches follow x
  return 0;
}

int32_t SparsePluginBase::LaunchStatus(cudaError_t err) const {
  if (err == cudaSuccess) return 0;
  Log(nvinfer1::ILogger::Severity::kERROR, std::string(getPluginName()) + ": " + cudaGetErrorString(err));
  return -1;
}

bool SparsePluginBase::SupportsSlot(SlotKind kind, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t pos) const {
  const nvinfer1::PluginTensorDesc& d = in_out[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (kind) {
    // PluginTensorDesc documents kBOOL as unsupported for plugin I/O: masks arrive as int32
    case SlotKind::kMask: return d.type == nvinfer1::DataType::kINT32;
    case SlotKind::kInt64: return d.type == nvinfer1::DataType::kINT64;
    case SlotKind::kFloat:
      if (pos == 0)
        return d.type == nvinfer1::DataType::kFLOAT || d.type == nvinfer1::DataType::kHALF ||
               d.type == nvinfer1::DataType::kBF16;
      return d.type == in_out[0].desc.type;
  }
  return false;
}

}  // namespace trt
}  // namespace shadowllm

namespace shadowllm {
namespace trt {

std::string DimsText(const nvinfer1::Dims& dims) {
  std::string out = "[";
  for (int32_t i = 0; i < dims.nbDims; ++i) out += (i ? "," : "") + std::to_string(dims.d[i]);
  return out + "]";
}

std::string ExpectDims(const nvinfer1::Dims& dims, const std::vector<int64_t>& want, const char* name) {
  bool ok = dims.nbDims == static_cast<int32_t>(want.size());
  for (int32_t i = 0; ok && i < dims.nbDims; ++i) ok = want[i] < 0 || dims.d[i] == want[i];
  if (ok) return "";
  std::string expected = "[";
  for (size_t i = 0; i < want.size(); ++i) expected += (i ? "," : "") + (want[i] < 0 ? std::string("*") : std::to_string(want[i]));
  return std::string(name) + " is " + DimsText(dims) + ", expected " + expected + "]";
}

int32_t SparsePluginBase::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                        const nvinfer1::PluginTensorDesc*, int32_t) noexcept {
  try {
    const std::string why = ShapeError(in, nb_inputs);
    if (why.empty()) return 0;
    Log(nvinfer1::ILogger::Severity::kERROR, std::string(getPluginName()) + ": " + why);
  } catch (...) {
    Log(nvinfer1::ILogger::Severity::kERROR, std::string(getPluginName()) + ": shape check failed");
  }
  return -1;
}

}  // namespace trt
}  // namespace shadowllm
