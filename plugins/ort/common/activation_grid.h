// The int8 activation grid (node attribute activation_bits = 8; docs/export-format.md): every
// projection's input is rounded in blocks of kBlock entries along the projection's input dimension,
// d = max|v| / 127 and v -> round(v / d) * d in fp32 (ties to even; a block of zeros stays zero), as
// models/quant.py's round_activations and the function bodies compute it. The kernels keep the
// codes as well: the integer decode kernels (weight_kernels.h) multiply them with the weight codes.
#pragma once

#include <cstdint>
#include <vector>

namespace shadowllm {

// x [S, D] on the grid, as codes: q in natural order, q_pairs per block in the order of int4 pairs
// (the block's 16 even entries, then its 16 odd ones: a byte of int4 codes holds entries 2j, 2j + 1),
// d the block scales and dsum = d * sum(q) per block (what an int4 block's minimum multiplies).
struct ActivationCodes {
  std::vector<int8_t> q, q_pairs;
  std::vector<float> d, dsum;  // [S, D / kBlock]
  int64_t S = 0, D = 0;
};

// The coefficients of a gather over listed input rows (weight_kernels.h GatherKeptRows) on the grid,
// as codes: q[i * S + s] of listed row i and token s, d[s * blocks + row / kBlock] its block's scale.
struct RowCodes {
  std::vector<int8_t> q;
  std::vector<float> d;
  int64_t blocks = 0;
};

// Rounds x [S, D] (D a multiple of kBlock) onto the grid in place; fills `codes` when not null.
void RoundToGrid(float* x, int64_t S, int64_t D, ActivationCodes* codes);

// Rounds the coefficients coeff[i * S + s] of input rows `rows` (ascending indices into the full
// input; the rows not listed are zeros there) onto the grid in place: per token, the listed rows
// that share a block (index / kBlock) are rounded together. Fills `codes` when not null.
void RoundRowsToGrid(const std::vector<int64_t>& rows, float* coeff, int64_t S, RowCodes* codes = nullptr);

// The codes of x's entries at `rows` (x rounded by RoundToGrid with these codes), for a gather.
void SelectRowCodes(const ActivationCodes& x, const std::vector<int64_t>& rows, RowCodes* out);

}  // namespace shadowllm
