// The activations SparseNeuronMLP accepts (docs/export-format.md), shared by the CPU kernels and the TensorRT plugin.
#pragma once

#include <stdexcept>
#include <string>

namespace shadowllm {

enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

inline Activation ParseActivation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  throw std::invalid_argument("SparseNeuronMLP: activation '" + name +
                              "' is not one of relu, gelu, gelu_tanh, silu");
}

inline const char* ActivationName(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
    case Activation::kSilu: return "silu";
  }
  return "relu";
}

}  // namespace shadowllm
