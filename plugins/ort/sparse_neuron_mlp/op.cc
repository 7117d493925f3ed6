#include "op.h"

namespace shadowllm {

SparseNeuronMLPKernel::SparseNeuronMLPKernel(const OrtKernelInfo* info)
    : activation(ParseActivation(Attribute<std::string>(info, "activation", "relu"))),
      channel_major(ChannelMajor(info, "SparseNeuronMLP")),
      activation_bits(ActivationBits(info, "SparseNeuronMLP")) {
  CheckBlockSize(info, "SparseNeuronMLP");
}

void SparseNeuronMLPKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const std::vector<int64_t> x_shape = InputShape(ctx, 0), w_shape = InputShape(ctx, 1);
  MLPArgs a{};
  a.B = x_shape[0];
  a.S = x_shape[1];
  a.D = x_shape[2];
  a.F = channel_major ? w_shape[1] : w_shape[0];
  a.x = InputData<float>(ctx, 0);
  const char* op = "SparseNeuronMLP";
  a.w_in = WeightInput(ctx, 1, 9, 10, channel_major, op, "w_in");
  a.b_in = InputData<float>(ctx, 2);
  a.w_gate = WeightInput(ctx, 3, 11, 12, channel_major, op, "w_gate");
  a.w_out_t = WeightInput(ctx, 4, 13, 14, true, op, "w_out_t");
  a.b_out = InputData<float>(ctx, 5);
  a.mask = InputData<bool>(ctx, 6);
  a.t_x = ScalarInput(ctx, 7, "SparseNeuronMLP", "t_x");
  a.t_h = ScalarInput(ctx, 8, "SparseNeuronMLP", "t_h");
  a.channel_major = channel_major;
  a.activation_bits = activation_bits;
  if (activation_bits && a.D % kBlock)
    throw std::invalid_argument("SparseNeuronMLP: activation_bits 8 needs an input width that is a multiple of 32");
  a.activation = activation;
  a.y = ctx.GetOutput(0, x_shape).GetTensorMutableData<float>();
  SparseNeuronMLP(a, OrtParallel(ctx));
}

}  // namespace shadowllm
