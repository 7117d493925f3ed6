// Cycles per 32-weight block of the int4 decode kernels (one thread, no onnxruntime), SmolLM2's MLP
// shape: the dot of a kept row with x (input projections) and the gather of kept rows (output
// projections), each with fp32 inputs and with inputs on the int8 activation grid (activation_bits 8:
// the dot multiplies the codes as bytes; the gather reads the rounded values as floats). What docs/performance.md's "4-bit weights" section quotes. Build and
// run from the repository root:
//   g++ -O3 -std=c++17 -Iplugins/ort/common research/decode_kernel_bench.cc \
//       plugins/ort/common/{weight_kernels,row_kernels,gemm,activation_grid}.cc -o /tmp/decode_kernel_bench \
//     && /tmp/decode_kernel_bench
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "activation_grid.h"
#include "weight_kernels.h"
using namespace shadowllm;

template <typename F>
static double Micros(int n, F f) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
}

int main() {
  const int64_t D = 576, F = 1536, blocks = F * D / 32;
  std::mt19937 g(0);
  std::vector<uint8_t> codes(F * D / 2);
  for (auto& c : codes) c = g();
  std::vector<uint16_t> sc(F * D / 32, 0x2000), mn(F * D / 32, 0xa000);
  Matrix w;  // [F, D], blocks along D: gate / up
  w.format = WeightFormat::kInt4, w.data = codes.data(), w.scale = sc.data(), w.minimum = mn.data();
  w.rows = F, w.cols = D, w.block_axis = 1;
  Matrix wt = w;  // [F, D], blocks along F: down (w_out_t)
  wt.block_axis = 0;
  std::vector<float> x(D), out(F), h(F), y(D);
  for (auto& v : x) v = (g() % 1000) / 1000.f - 0.5f;
  for (auto& v : h) v = (g() % 1000) / 1000.f - 0.5f;
  std::vector<int64_t> rows(F);
  for (int64_t i = 0; i < F; ++i) rows[i] = i;
  ActivationCodes x_codes;
  std::vector<float> xg = x, hg = h;
  RoundToGrid(xg.data(), 1, D, &x_codes);
  RoundRowsToGrid(rows, hg.data(), 1);
  Serial serial;
  const double cycles = 3000.0 / blocks;  // per block at a nominal 3 GHz
  for (int rep = 0; rep < 3; ++rep) {
    const int n = 2000;
    const double dot = Micros(n, [&] { ProjectKeptRows(x.data(), 1, w, rows, out.data(), serial); });
    const double gather = Micros(n, [&] { GatherKeptRows(wt, rows, h.data(), 1, 0, D, nullptr, y.data(), serial); });
    const double dot8 = Micros(n, [&] { ProjectKeptRows(xg.data(), 1, w, rows, out.data(), serial, &x_codes); });
    const double gather8 =
        Micros(n, [&] { GatherKeptRows(wt, rows, hg.data(), 1, 0, D, nullptr, y.data(), serial); });
    printf("1536x576 int4, cycles per 32-weight block: dot rows %.1f (fp32 x) / %.1f (int8 x) | gather %.1f / %.1f\n",
           dot * cycles, dot8 * cycles, gather * cycles, gather8 * cycles);
  }
  printf("%f %f\n", out[5], y[7]);
}
