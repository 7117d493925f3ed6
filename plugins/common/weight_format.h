// Projection weights as the sparse ops receive them (docs/export-format.md, "Quantized weights"):
// fp32 values, or codes in blocks of kBlock entries along the projection's input dimension, each
// block with an fp16 scale d (and, int4, an fp16 minimum m): w = d*q (+ m). int4 codes are unsigned
// 0..15, two per byte, the first of a pair in the low nibble (ONNX UINT4 packing); int8 codes are
// signed -127..127. One description for every backend: the CPU kernels read it, the CUDA kernels
// will read the same bytes.
#pragma once

#include <cstdint>
#include <cstring>

namespace shadowllm {

enum class WeightFormat : int { kF32 = 0, kInt8 = 1, kInt4 = 2 };
constexpr int64_t kBlock = 32;

// A [rows, cols] projection in one of the formats. Blocks run along `block_axis` (the input
// dimension): 1 for a row-major input projection [out, in], 0 for a channel-major one [in, out] and
// for the output projections [in, out]. scale / minimum are [rows, cols/kBlock] (axis 1) or
// [rows/kBlock, cols] (axis 0); minimum only for int4.
struct Matrix {
  WeightFormat format = WeightFormat::kF32;
  const void* data = nullptr;
  const uint16_t* scale = nullptr;  // fp16 bits
  const uint16_t* minimum = nullptr;
  int64_t rows = 0, cols = 0;
  int block_axis = 1;

  bool present() const { return data != nullptr; }
  const float* f32() const { return static_cast<const float*>(data); }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(data); }
};

// IEEE half -> float, exact (normals, subnormals, inf/nan), for scalar paths and tests.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One weight's value (scalar; the kernels decode whole blocks in registers instead).
inline float WeightAt(const Matrix& w, int64_t r, int64_t c) {
  if (w.format == WeightFormat::kF32) return w.f32()[r * w.cols + c];
  const int64_t blocks_per_row = w.block_axis == 1 ? w.cols / kBlock : w.cols;
  const int64_t b = w.block_axis == 1 ? r * blocks_per_row + c / kBlock : (r / kBlock) * w.cols + c;
  const float d = HalfToFloat(w.scale[b]);
  const int64_t i = r * w.cols + c;
  if (w.format == WeightFormat::kInt8) return d * static_cast<float>(reinterpret_cast<const int8_t*>(w.data)[i]);
  const uint8_t byte = w.bytes()[i / 2];
  const float q = static_cast<float>((i & 1) ? byte >> 4 : byte & 15);
  return d * q + HalfToFloat(w.minimum[b]);
}

}  // namespace shadowllm
