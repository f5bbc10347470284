// Checks the interleaved F32/F16/BF16 kernels (vendor patch 0017) as compiled for whatever
// instruction set this file is built for: tests/test_kernels_isa.py builds it with AVX2 only
// (no AVX-512), the kernels every x86 CPU since 2013 runs, which the native build of the
// package does not use on an AVX-512 machine.
//
// For each type and shape: the product of n rows (1..150, MUL_MAT and MUL_MAT_ID) must give
// every row the bits it gets alone, and match a float64 reference. Single-threaded: the
// thread-pool hooks below stand in for the CPU backend's.

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "interleaved-rows.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
void ggml_barrier(struct ggml_threadpool *) {}
static int next_chunk;
void ggml_threadpool_chunk_set(struct ggml_threadpool *, int value) { next_chunk = value; }
int ggml_threadpool_chunk_add(struct ggml_threadpool *, int value) {
    next_chunk += value;
    return next_chunk - value;
}
void ggml_cpu_fp32_to_fp16(const float * x, ggml_fp16_t * y, int64_t n) { ggml_fp32_to_fp16_row(x, y, n); }
void ggml_cpu_fp32_to_bf16(const float * x, ggml_bf16_t * y, int64_t n) { ggml_fp32_to_bf16_row(x, y, n); }
}

namespace {

float rounded(ggml_type t, float v) {
    if (t == GGML_TYPE_F16) return ggml_fp16_to_fp32(ggml_fp32_to_fp16(v));
    if (t == GGML_TYPE_BF16) return ggml_bf16_to_fp32(ggml_fp32_to_bf16(v));
    return v;
}

// out[n][m] = rows x[0..n) times the interleaved weight w (n_as experts; with ids, row i uses
// expert ids[i]).
std::vector<float> product(ggml_tensor * w, const std::vector<float> & x, int n, const std::vector<int32_t> * ids) {
    const int64_t k = w->ne[0], m = w->ne[1];
    ggml_init_params ip = { 64 * 1024 * 1024, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * dst;
    if (ids) {
        ggml_tensor * xt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k, 1, n);
        memcpy(xt->data, x.data(), (size_t) k * n * sizeof(float));
        ggml_tensor * it = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
        memcpy(it->data, ids->data(), n * sizeof(int32_t));
        dst = ggml_mul_mat_id(ctx, w, xt, it);
    } else {
        ggml_tensor * xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
        memcpy(xt->data, x.data(), (size_t) k * n * sizeof(float));
        dst = ggml_mul_mat(ctx, w, xt);
    }
    std::vector<char> work(ggml_interleaved_work_size(dst));
    ggml_compute_params params = { 0, 1, work.size(), work.data(), nullptr, false };
    if (ids) {
        ggml_interleaved_mul_mat_id(&params, dst);
    } else {
        ggml_interleaved_mul_mat(&params, dst);
    }
    std::vector<float> out((size_t) m * n);
    memcpy(out.data(), dst->data, out.size() * sizeof(float));
    ggml_free(ctx);
    return out;
}

int check(ggml_type type, int64_t k, int64_t m, int64_t n_as) {
    ggml_init_params ip = { (size_t) k * m * n_as * 4 + 1024 * 1024, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = n_as > 1 ? ggml_new_tensor_3d(ctx, type, k, m, n_as) : ggml_new_tensor_2d(ctx, type, k, m);
    if (!ggml_interleaved_supported(w)) {
        printf("FAIL %s k=%lld m=%lld: not taken by the interleaved layout\n", ggml_type_name(type), (long long) k,
               (long long) m);
        return 1;
    }
    std::vector<float> wf((size_t) k * m * n_as);
    for (size_t i = 0; i < wf.size(); ++i) wf[i] = sinf(0.37f * i) * (1 + i % 5);
    std::vector<char> rowmajor(ggml_nbytes(w));
    ggml_quantize_chunk(type, wf.data(), rowmajor.data(), 0, m * n_as, k, nullptr);
    if (ggml_interleaved_repack(w, rowmajor.data(), rowmajor.size()) != 0) {
        printf("FAIL %s: repack refused\n", ggml_type_name(type));
        return 1;
    }
    const int N = 150;
    std::vector<float> x((size_t) k * N);
    for (size_t i = 0; i < x.size(); ++i) x[i] = cosf(0.11f * i) * (1 + i % 7);
    std::vector<int32_t> ids(N);
    for (int i = 0; i < N; ++i) ids[i] = (i * 7 + i / 3) % n_as;
    const std::vector<int32_t> * route = n_as > 1 ? &ids : nullptr;

    int failures = 0;
    std::vector<float> alone((size_t) m * N);
    double worst = 0;
    for (int r = 0; r < N; ++r) {
        std::vector<float> xr(x.begin() + (size_t) r * k, x.begin() + (size_t) (r + 1) * k);
        std::vector<int32_t> idr(1, ids[r]);
        std::vector<float> o = product(w, xr, 1, route ? &idr : nullptr);
        memcpy(&alone[(size_t) r * m], o.data(), m * sizeof(float));
        const int64_t e = route ? ids[r] : 0;
        for (int64_t j = 0; j < m; ++j) {
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < k; ++i) {
                const double p = (double) rounded(type, wf[(size_t) (e * m + j) * k + i]) * rounded(type, x[(size_t) r * k + i]);
                ref += p;
                mag += fabs(p);
            }
            worst = fmax(worst, fabs(ref - o[j]) / (mag + 1e-30));
        }
    }
    if (worst > 1e-5) {
        printf("FAIL %s k=%lld m=%lld experts=%lld: relative error %.3g against float64\n", ggml_type_name(type),
               (long long) k, (long long) m, (long long) n_as, worst);
        failures++;
    }
    for (int n : { 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64, 65, 150 }) {
        std::vector<float> o = product(w, x, n, route);
        if (memcmp(o.data(), alone.data(), (size_t) n * m * sizeof(float)) != 0) {
            printf("FAIL %s k=%lld m=%lld experts=%lld: %d rows differ from the rows alone\n", ggml_type_name(type),
                   (long long) k, (long long) m, (long long) n_as, n);
            failures++;
        }
    }
    printf("%s %s k=%lld m=%lld experts=%lld\n", failures ? "FAIL" : "ok", ggml_type_name(type), (long long) k,
           (long long) m, (long long) n_as);
    ggml_free(ctx);
    return failures;
}

}  // namespace

int main() {
    int failures = 0;
    for (ggml_type type : { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 }) {
        failures += check(type, 64, 16, 1);
        failures += check(type, 544, 12, 1);
        failures += check(type, 256, 8, 3);
    }
    printf(failures ? "FAILED\n" : "PASSED\n");
    return failures ? 1 : 0;
}
