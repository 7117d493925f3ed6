// Cycles per 32-weight block of the int4 decode kernels (one thread, no onnxruntime): the dot of a
// kept row with x (input projections) and the gather of kept rows (output projections), SmolLM2's
// MLP shape. What docs/performance.md's "4-bit weights" section quotes. Build and run from the
// repository root:
//   g++ -O3 -std=c++17 -Iplugins/ort/common research/decode_kernel_bench.cc \
//       plugins/ort/common/{weight_kernels,row_kernels,gemm}.cc -o /tmp/decode_kernel_bench && /tmp/decode_kernel_bench
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
#include "weight_kernels.h"
using namespace shadowllm;
int main(int argc, char** argv) {
  const int64_t D = 576, F = 1536;
  std::mt19937 g(0);
  std::vector<uint8_t> codes(F * D / 2);
  for (auto& c : codes) c = g();
  std::vector<uint16_t> sc(F * D / 32, 0x2000), mn(F * D / 32, 0xa000);
  Matrix w; w.format = WeightFormat::kInt4; w.data = codes.data(); w.scale = sc.data(); w.minimum = mn.data();
  w.rows = F; w.cols = D; w.block_axis = 1;
  Matrix wt = w; wt.rows = F; wt.cols = D; wt.block_axis = 0;  // [F, D], blocks along F
  std::vector<float> x(D), out(F), h(F), y(D);
  for (auto& v : x) v = (g() % 1000) / 1000.f;
  for (auto& v : h) v = (g() % 1000) / 1000.f;
  std::vector<int64_t> rows(F); for (int64_t i = 0; i < F; ++i) rows[i] = i;
  Serial serial;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    const int n = 2000;
    for (int i = 0; i < n; ++i) ProjectKeptRows(x.data(), 1, w, rows, out.data(), serial);
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) GatherKeptRows(wt, rows, h.data(), 1, 0, D, nullptr, y.data(), serial);
    auto t2 = std::chrono::steady_clock::now();
    double a = std::chrono::duration<double, std::micro>(t1 - t0).count() / n;
    double b = std::chrono::duration<double, std::micro>(t2 - t1).count() / n;
    printf("dot rows (1536x576): %.1f us = %.1f cycles/block at 3 GHz | gather (1536x576): %.1f us = %.1f cyc/block\n",
           a, a * 3000 / (F * D / 32), b, b * 3000 / (F * D / 32));
  }
  printf("%f %f\n", out[5], y[7]);
}
