// The creator side both ops share: name/version/namespace, the accepted fields, and turning a
// parse failure into a TensorRT log line and a null plugin (never an exception across the ABI).
#pragma once

#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "plugin_utils.h"

namespace shadowllm {
namespace trt {

class SparseCreatorBase : public nvinfer1::IPluginCreatorV3One {
 public:
  SparseCreatorBase(const char* name, std::vector<nvinfer1::PluginField> fields) : name_(name), fields_(std::move(fields)) {
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return name_; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }
  nvinfer1::IPluginV3* createPlugin(const char* layer, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      return Create(FieldReader(fc));
    } catch (const std::exception& e) {
      Log(nvinfer1::ILogger::Severity::kERROR,
          std::string(name_) + " (layer " + (layer ? layer : "?") + "): " + e.what());
      return nullptr;
    }
  }

 protected:
  virtual nvinfer1::IPluginV3* Create(const FieldReader& fields) = 0;

 private:
  const char* name_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

}  // namespace trt
}  // namespace shadowllm
