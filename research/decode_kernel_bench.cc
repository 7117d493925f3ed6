// Cycles per 32-weight block of the int4 decode kernels (one thread, no onnxruntime), SmolLM2's MLP
// shape: the dot of a kept row with x (input projections: gate / up) and the gather of kept rows
// (output projections: down; also the channel-major input projections of activation thresholds), x
// and the gather's coefficients on the int8 activation grid (activation_bits 8) or in fp32; and the
// channel-major gate / up shape [576, 1536] of the threshold policies (every channel, about 3/4). With
// `layers` > 1 every pass reads that many distinct matrices, 442 KB each: 150 (66 MB) is out of the
// 32 MB L3, as a real decode step is; 1 stays in L2. What docs/performance.md's "4-bit weights"
// section quotes. Build and run from the repository root:
//   g++ -O3 -std=c++17 -Wno-psabi -Iplugins/ort/common research/decode_kernel_bench.cc \
//       plugins/ort/common/{weight_kernels,row_kernels,gemm,activation_grid}.cc -o /tmp/decode_kernel_bench \
//     && /tmp/decode_kernel_bench 1 && /tmp/decode_kernel_bench 150
// Cycles are at a nominal 3 GHz; this machine's VMs are noisy: the best of 7 rounds is reported.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

int main(int argc, char** argv) {
  const int64_t D = 576, F = 1536, blocks = F * D / 32;
  const int L = argc > 1 ? std::atoi(argv[1]) : 1;
  std::mt19937 g(0);
  std::vector<std::vector<uint8_t>> codes(L, std::vector<uint8_t>(F * D / 2));
  std::vector<uint16_t> sc(F * D / 32, 0x2000), mn(F * D / 32, 0xa000);  // shared: 3% of the bytes
  std::vector<Matrix> w(L), wt(L), wc(L);
  for (int l = 0; l < L; ++l) {
    for (auto& c : codes[l]) c = g();
    w[l].format = WeightFormat::kInt4, w[l].data = codes[l].data(), w[l].scale = sc.data();
    w[l].minimum = mn.data(), w[l].rows = F, w[l].cols = D, w[l].block_axis = 1;  // [F, D]: gate / up
    wt[l] = w[l];
    wt[l].block_axis = 0;  // [F, D], blocks along F: down (w_out_t)
    wc[l] = wt[l];
    wc[l].rows = D, wc[l].cols = F;  // [D, F], blocks along D: gate / up stored channel-major (thresholds)
  }
  std::vector<float> x(D), out(F), h(F), y(D);
  for (auto& v : x) v = (g() % 1000) / 1000.f - 0.5f;
  for (auto& v : h) v = (g() % 1000) / 1000.f - 0.5f;
  std::vector<int64_t> rows(F), half;  // every row; about half of them, at random
  for (int64_t i = 0; i < F; ++i) {
    rows[i] = i;
    if (g() & 1) half.push_back(i);
  }
  ActivationCodes x_codes;
  std::vector<float> xg = x, hg = h, hh(half.size());
  for (size_t i = 0; i < half.size(); ++i) hh[i] = h[half[i]];
  RowCodes h_codes, hh_codes;
  RoundToGrid(xg.data(), 1, D, &x_codes);
  RoundRowsToGrid(rows, hg.data(), 1, &h_codes);
  RoundRowsToGrid(half, hh.data(), 1, &hh_codes);
  std::vector<int64_t> channels(D), some;  // a channel-major projection's kept channels: all, about 3/4
  std::vector<float> xc(D), xs;
  for (int64_t i = 0; i < D; ++i) {
    channels[i] = i;
    xc[i] = x[i];
    if (g() % 4) some.push_back(i), xs.push_back(x[i]);
  }
  RowCodes c_codes, s_codes;
  RoundRowsToGrid(channels, xc.data(), 1, &c_codes);
  RoundRowsToGrid(some, xs.data(), 1, &s_codes);
  std::vector<float> z(F);
  Serial serial;
  const double cycles = 3000.0 / blocks / L;  // per block at 3 GHz
  const int n = 3000 / L + 2;
  double best[8] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
  for (int round = 0; round < 7; ++round) {
    const double t[8] = {
        Micros(n, [&] { for (auto& m : w) ProjectKeptRows(x.data(), 1, m, rows, out.data(), serial); }),
        Micros(n, [&] { for (auto& m : w) ProjectKeptRows(xg.data(), 1, m, rows, out.data(), serial, &x_codes); }),
        Micros(n, [&] { for (auto& m : wt) GatherKeptRows(m, rows, h.data(), 1, 0, D, nullptr, y.data(), serial); }),
        Micros(n, [&] { for (auto& m : wt) GatherKeptRows(m, rows, hg.data(), 1, 0, D, nullptr, y.data(), serial, &h_codes); }),
        Micros(n, [&] { for (auto& m : wt) GatherKeptRows(m, half, hh.data(), 1, 0, D, nullptr, y.data(), serial); }),
        Micros(n, [&] { for (auto& m : wt) GatherKeptRows(m, half, hh.data(), 1, 0, D, nullptr, y.data(), serial, &hh_codes); }),
        Micros(n, [&] { for (auto& m : wc) GatherKeptRows(m, channels, xc.data(), 1, 0, F, nullptr, z.data(), serial, &c_codes); }),
        Micros(n, [&] { for (auto& m : wc) GatherKeptRows(m, some, xs.data(), 1, 0, F, nullptr, z.data(), serial, &s_codes); })};
    for (int i = 0; i < 8; ++i) best[i] = std::min(best[i], t[i]);
  }
  printf("%d x 1536x576 int4, cycles per 32-weight block (fp32 / int8 inputs): dot rows %.1f / %.1f | "
         "gather every row %.1f / %.1f | gather half the rows %.1f / %.1f (per block of the whole matrix)\n"
         "channel-major 576x1536 (int8 inputs): every channel %.1f | 3/4 of the channels %.1f\n",
         L, best[0] * cycles, best[1] * cycles, best[2] * cycles, best[3] * cycles, best[4] * cycles,
         best[5] * cycles, best[6] * cycles, best[7] * cycles);
  printf("(checksum %f %f %f)\n", out[5], y[7], z[9]);
}
