// The sparse products of both ops over a projection in any weight format (plugins/common/weight_format.h).
// fp32 goes to the row kernels (row_kernels.h) as before. Quantized weights: at decode (S < 4 tokens)
// the codes of the kept rows are decoded in registers inside the loop, so a step reads only the kept
// rows' codes and their blocks' scales; a prompt (S >= 4) dequantizes the kept rows once into an
// fp32 scratch and runs the fp32 blocked products, whose cost the S tokens share.
#pragma once

#include <cstdint>
#include <vector>

#include "../../common/weight_format.h"
#include "activation_grid.h"
#include "parallel.h"

namespace shadowllm {

// out[i * S + s] = x[s, :] . w[rows[i], :] for a matrix whose rows are the outputs (row-major input
// projection [out, in]: blocks along its rows, block_axis 1). x is [S, w.cols]. codes: x's codes on the
// int8 activation grid (x then holds their values) — a decode step over quantized weights multiplies
// them as integers (8-bit products summed in 16 and 32 bits, one fp32 scale per block) instead of
// converting every weight code to a float.
void ProjectKeptRows(const float* x, int64_t S, const Matrix& w, const std::vector<int64_t>& rows, float* out,
                     const Parallel& parallel, const ActivationCodes* codes = nullptr);

// y[s * width + c] = bias[c] + sum_i coeff[i * S + s] * w[rows[i], col + c] for a matrix whose rows are
// the inputs (output projections, channel-major input projections: block_axis 0). rows ascending;
// bias may be null; col even. codes: the coefficients' codes on the int8 activation grid (coeff
// then holds their values) — a decode step over int4 weights sums code products as integers, pairs
// of kept rows at a time, and scales each column once per block.
void GatherKeptRows(const Matrix& w, const std::vector<int64_t>& rows, const float* coeff, int64_t S, int64_t col,
                    int64_t width, const float* bias, float* y, const Parallel& parallel,
                    const RowCodes* codes = nullptr);

// Whether GatherKeptRows multiplies a call's coefficients as integer codes, so that its caller has
// them rounded with codes (RoundRowsToGrid): a decode step (S = 1) over int4 weights, width a multiple
// of 32, on AVX2. Elsewhere the codes would go unread.
// One of several gathers over the same listed rows and coefficients (q, k and v of attention, gate and
// up of the MLP, all from one input's kept channels): y[s * width + c] = bias[c] + sum_i coeff[i * S + s]
// * w[rows[i], col + c]. The jobs run in one parallel region.
struct GatherJob {
  const Matrix* w;
  int64_t col, width;
  const float* bias;  // may be null
  float* y;
};
void GatherKeptRows(const std::vector<GatherJob>& jobs, const std::vector<int64_t>& rows, const float* coeff,
                    int64_t S, const Parallel& parallel, const RowCodes* codes = nullptr);

bool GatherTakesCodes(const Matrix& w, int64_t S, int64_t width);

// Channel-major input projections (activation thresholds), one job each: columns [job.col, job.col +
// job.width) of a [D, ld] weight stored one row per input channel, of which only the kept `channels`
// are read: job.y[s, :] = bias + sum over kept d of x[s, d] * w[d, col : col + width] (row-major
// [S, width]). The jobs (q, k and v, or gate and up: one input) run in one parallel region. x must
// already hold zeros where the threshold dropped an entry of a token; codes: x's codes when x is on
// the int8 grid (RoundToGrid).
void ChannelProject(const float* x, int64_t S, int64_t D, const std::vector<int64_t>& channels,
                    const std::vector<GatherJob>& jobs, const Parallel& parallel,
                    const ActivationCodes* codes = nullptr);

// w[r, c0:c1) as fp32 into out (any format and block axis; c0, c1 multiples of 32 for quantized
// matrices, or c1 the row's end).
void DequantizeRow(const Matrix& w, int64_t r, int64_t c0, int64_t c1, float* out);

}  // namespace shadowllm
