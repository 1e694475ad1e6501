/* Fused float32 CPU kernels for bce and nce (see _fused.py, which compiles and loads this file).
 *
 * softplus_row_sums: out[i] = sum over j != skip[i] of softplus(z[i, j] - shift), in one pass over each row.
 *   softplus(v) = max(v, 0) + log1p(exp(-|v|)), with log1p(t) for t in [0, 1] as 2 atanh(s), s = t / (2 + t)
 *   (s <= 1/3, so eight terms of the atanh series reach float32's precision: the first omitted one is below
 *   2^-29 of the sum). No cancellation anywhere: every term is computed to a few ulps, whatever v.
 *   Sums run in float32 SIMD lanes over blocks of 256 entries, the blocks added in double.
 * scaled_sigmoid: grad[i, j] = scale[i] * sigmoid(z[i, j] - shift), the backward of the above.
 *
 * exp comes from glibc's vector math library (libmvec), declared SIMD below, so that the loops vectorise
 * without -ffast-math: NaN and infinities keep their IEEE meaning (a NaN logit gives a NaN row).
 */
#include <math.h>
#include <stdint.h>

#pragma omp declare simd notinbranch
float expf(float);

#pragma omp declare simd notinbranch
static inline float log1p_unit(float t) {
    float s = t / (2.0f + t), q = s * s;
    float p = 1.0f / 15;
    p = p * q + 1.0f / 13;
    p = p * q + 1.0f / 11;
    p = p * q + 1.0f / 9;
    p = p * q + 1.0f / 7;
    p = p * q + 1.0f / 5;
    p = p * q + 1.0f / 3;
    p = p * q + 1.0f;
    return 2.0f * s * p;
}

static double softplus_sum(const float *row, int64_t begin, int64_t end, float shift) {
    double total = 0.0;
    for (int64_t start = begin; start < end; start += 256) {
        int64_t stop = start + 256 < end ? start + 256 : end;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = start; j < stop; ++j) {
            float v = row[j] - shift;
            acc += (v > 0.0f ? v : 0.0f) + log1p_unit(expf(-fabsf(v)));
        }
        total += acc;
    }
    return total;
}

void softplus_row_sums(const float *z, int64_t m, int64_t k, float shift, const int64_t *skip, float *out) {
    for (int64_t i = 0; i < m; ++i) {
        const float *row = z + i * k;
        double total;
        if (skip != 0 && skip[i] >= 0 && skip[i] < k)
            total = softplus_sum(row, 0, skip[i], shift) + softplus_sum(row, skip[i] + 1, k, shift);
        else
            total = softplus_sum(row, 0, k, shift);
        out[i] = (float)total;
    }
}

void scaled_sigmoid(const float *z, int64_t m, int64_t k, float shift, const float *scale, float *grad) {
    for (int64_t i = 0; i < m; ++i) {
        const float *row = z + i * k;
        float *g = grad + i * k;
        float c = scale[i];
#pragma omp simd
        for (int64_t j = 0; j < k; ++j)
            g[j] = c / (1.0f + expf(shift - row[j]));
    }
}
