#include "op.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "../common/weight_kernels.h"

namespace shadowllm {

BlockedMatMulKernel::BlockedMatMulKernel(const OrtKernelInfo* info)
    : activation_bits(ActivationBits(info, "BlockedMatMul")) {
  CheckBlockSize(info, "BlockedMatMul");
}

// Every row of w is kept, so this is ProjectKeptRows over all of them: a decode step (a few tokens)
// decodes the codes in registers; more tokens dequantize a chunk of rows at a time into fp32 and run
// the blocked GEMM (chunks: the whole fp32 head would be 4x the codes' memory at once).
void BlockedMatMulKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const std::vector<int64_t> x_shape = InputShape(ctx, 0);
  const Matrix w = WeightInput(ctx, 1, 2, 3, false, "BlockedMatMul", "w");
  if (w.format == WeightFormat::kF32) throw std::invalid_argument("BlockedMatMul: input w must be int8 or uint4 codes");
  if (x_shape.empty() || x_shape.back() != w.cols)
    throw std::invalid_argument("BlockedMatMul: x's last dimension must equal w's columns (" +
                                std::to_string(w.cols) + ")");
  std::vector<int64_t> y_shape = x_shape;
  y_shape.back() = w.rows;
  const int64_t T = std::accumulate(x_shape.begin(), x_shape.end() - 1, int64_t{1}, std::multiplies<int64_t>());
  const float* x = InputData<float>(ctx, 0);
  std::vector<float> grid_x;
  ActivationCodes codes;
  if (activation_bits) {  // x on the int8 grid; a decode step's rows then multiply codes as integers
    grid_x.assign(x, x + T * w.cols);
    RoundToGrid(grid_x.data(), T, w.cols, &codes);
    x = grid_x.data();
  }
  float* y = ctx.GetOutput(0, y_shape).GetTensorMutableData<float>();
  if (T == 0 || w.rows == 0) return;
  const OrtParallel parallel(ctx);
  const int64_t chunk = T < 4 ? w.rows : 4096;
  // The row list and the product are reused across calls on this thread: at a decode step (T = 1) the
  // head's 49k-row list and its logits were otherwise allocated, faulted in and zeroed every token.
  thread_local std::vector<int64_t> rows;
  thread_local std::vector<float> out;
  for (int64_t r0 = 0; r0 < w.rows; r0 += chunk) {
    const int64_t r1 = std::min(w.rows, r0 + chunk);
    if (rows.size() != static_cast<size_t>(r1 - r0) || (!rows.empty() && rows[0] != r0)) {
      rows.resize(static_cast<size_t>(r1 - r0));
      std::iota(rows.begin(), rows.end(), r0);
    }
    // one token: out[i * T + t] is y's own layout, so the rows land in place
    float* dst = T == 1 ? y + r0 : (out.resize(static_cast<size_t>((r1 - r0) * T)), out.data());
    ProjectKeptRows(x, T, w, rows, dst, parallel, activation_bits ? &codes : nullptr);  // dst[i * T + t]
    if (T != 1)
      for (int64_t i = 0; i < r1 - r0; ++i)
        for (int64_t t = 0; t < T; ++t) y[t * w.rows + r0 + i] = out[i * T + t];
  }
}

}  // namespace shadowllm
