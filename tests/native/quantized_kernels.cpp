// Checks the batch-invariant kernels for quantized weights (vendor patches 0014, 0018) as
// compiled for whatever instruction set this file is built for: tests/test_kernels_isa.py
// builds it, with batch-invariant.cpp and upstream's x86 one-row kernels (arch/x86/repack.cpp,
// arch/x86/quants.c), for AVX2 without AVX-512 and for AVX-512.
//
// For each type and shape: every row of a product of n rows (1..9, 16, 33, 64) must have the
// bits the one-row kernel gives that row alone (gemv for the repacked Q4_0/Q4_K layouts, on
// all columns or a later range of them as a thread's chunk is; vec_dot for plain Q8_0, Q5_K,
// Q6_K), and batches of 2 or more rows must take the kernel (it must exist for this build).
// Repacked weights are repacked by the package's CPU backend (its repack buffer).

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "batch-invariant.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" {
void ggml_gemv_q4_0_8x8_q8_0(int n, float * s, size_t bs, const void * vx, const void * vy, int nr, int nc);
void ggml_gemv_q4_K_8x8_q8_K(int n, float * s, size_t bs, const void * vx, const void * vy, int nr, int nc);
void ggml_vec_dot_q8_0_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_q5_K_q8_K(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_q6_K_q8_K(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
}

namespace {

int failures = 0;

void check(bool ok, const std::string & what) {
    if (!ok) {
        std::printf("FAIL %s\n", what.c_str());
        ++failures;
    }
}

bool nonzero(const std::vector<float> & v) {
    for (float x : v) {
        if (x != 0.0f) return true;
    }
    return false;
}

ggml_backend_buffer_type_t repack_buffer_type() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    for (auto * bt = get_extra ? get_extra(dev) : nullptr; bt && *bt; ++bt) {
        if (std::strcmp(ggml_backend_buft_name(*bt), "CPU_REPACK") == 0) {
            return *bt;
        }
    }
    return nullptr;
}

struct repacked_weight {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_tensor * t = nullptr;
    ~repacked_weight() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
};

void run_repacked_case(ggml_type type, ggml_type act_type, int k, int m, std::mt19937 & rng) {
    const std::string name = std::string(ggml_type_name(type)) + " k=" + std::to_string(k) + " m=" + std::to_string(m);
    std::normal_distribution<float> normal;
    std::vector<float> w((size_t) k * m), x((size_t) k * 64);
    for (auto & v : w) v = normal(rng);
    for (auto & v : x) v = normal(rng) * 3.0f;

    repacked_weight rw;
    ggml_init_params ip = { ggml_tensor_overhead(), nullptr, true };
    rw.ctx = ggml_init(ip);
    rw.t = ggml_new_tensor_2d(rw.ctx, type, k, m);
    rw.buf = ggml_backend_alloc_ctx_tensors_from_buft(rw.ctx, repack_buffer_type());
    std::vector<uint8_t> plain(ggml_row_size(type, k) * m);
    ggml_quantize_chunk(type, w.data(), plain.data(), 0, m, k, nullptr);
    ggml_backend_tensor_set(rw.t, plain.data(), 0, plain.size());   // repacks
    const char * wdata = (const char *) rw.t->data;

    const size_t act_row = ggml_row_size(act_type, k);
    std::vector<uint8_t> y(act_row * 64);
    for (int r = 0; r < 64; ++r) {
        ggml_get_type_traits_cpu(act_type)->from_float(x.data() + (size_t) r * k, y.data() + r * act_row, k);
    }
    auto gemv = type == GGML_TYPE_Q4_0 ? ggml_gemv_q4_0_8x8_q8_0 : ggml_gemv_q4_K_8x8_q8_K;
    auto rows = type == GGML_TYPE_Q4_0 ? ggml_bi_gemv_q4_0_8x8_q8_0_rows : ggml_bi_gemv_q4_K_8x8_q8_K_rows;
    std::vector<float> ref((size_t) 64 * m);
    for (int r = 0; r < 64; ++r) {
        gemv(k, ref.data() + (size_t) r * m, m, wdata, y.data() + r * act_row, 1, m);
    }
    check(nonzero(ref), name + ": the one-row products are all zero (a broken set-up, not a test)");
    // a column range as a thread gets it: groups of 8 columns from column c0
    const size_t group_bytes = ggml_row_size(type, k) * 8;
    for (int c0 : {0, 8}) {
        if (c0 >= m) continue;
        const int nc = m - c0;
        for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64}) {
            std::vector<float> out((size_t) n * m, -1.0f);
            float * s[GGML_BI_MAX_ROWS];
            const void * yr[GGML_BI_MAX_ROWS];
            for (int r = 0; r < n; ++r) {
                s[r] = out.data() + (size_t) r * m + c0;
                yr[r] = y.data() + r * act_row;
            }
            const bool taken = rows(k, s, wdata + (c0 / 8) * group_bytes, yr, n, nc);
            check(taken || n == 1, name + " n=" + std::to_string(n) + ": no kernel for this build");
            if (!taken) continue;
            for (int r = 0; r < n; ++r) {
                const bool same = std::memcmp(out.data() + (size_t) r * m + c0, ref.data() + (size_t) r * m + c0,
                                              sizeof(float) * nc) == 0;
                check(same, name + " c0=" + std::to_string(c0) + " n=" + std::to_string(n) + " row " +
                      std::to_string(r) + " differs from gemv");
            }
        }
    }
}

// Plain layout: nx weight rows against n rows through ggml_bi_vec_dot_rows.
void run_plain_case(ggml_type type, ggml_type act_type, int k, int m, std::mt19937 & rng) {
    const std::string name = std::string(ggml_type_name(type)) + " k=" + std::to_string(k) + " m=" + std::to_string(m);
    std::normal_distribution<float> normal;
    std::vector<float> w((size_t) k * m), x((size_t) k * 64);
    for (auto & v : w) v = normal(rng);
    for (auto & v : x) v = normal(rng) * 3.0f;
    const size_t w_row = ggml_row_size(type, k), act_row = ggml_row_size(act_type, k);
    std::vector<uint8_t> wq(w_row * m), y(act_row * 64);
    ggml_quantize_chunk(type, w.data(), wq.data(), 0, m, k, nullptr);
    for (int r = 0; r < 64; ++r) {
        ggml_get_type_traits_cpu(act_type)->from_float(x.data() + (size_t) r * k, y.data() + r * act_row, k);
    }
    auto vec_dot = type == GGML_TYPE_Q8_0 ? ggml_vec_dot_q8_0_q8_0
                 : type == GGML_TYPE_Q5_K ? ggml_vec_dot_q5_K_q8_K : ggml_vec_dot_q6_K_q8_K;
    std::vector<float> ref((size_t) 64 * m);
    for (int r = 0; r < 64; ++r) {
        for (int c = 0; c < m; ++c) {
            vec_dot(k, &ref[(size_t) r * m + c], 0, wq.data() + c * w_row, 0, y.data() + r * act_row, 0, 1);
        }
    }
    check(nonzero(ref), name + ": the one-row products are all zero (a broken set-up, not a test)");
    for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64}) {
        std::vector<float> out((size_t) n * m, -1.0f);
        float * s[GGML_BI_MAX_ROWS];
        const void * yr[GGML_BI_MAX_ROWS];
        for (int r = 0; r < n; ++r) {
            s[r] = out.data() + (size_t) r * m;
            yr[r] = y.data() + r * act_row;
        }
        const bool taken = ggml_bi_vec_dot_rows(type, k, wq.data(), w_row, m, yr, n, s);
        check(taken, name + " n=" + std::to_string(n) + ": no kernel for this build");
        if (!taken) continue;
        for (int r = 0; r < n; ++r) {
            check(std::memcmp(out.data() + (size_t) r * m, ref.data() + (size_t) r * m, sizeof(float) * m) == 0,
                  name + " n=" + std::to_string(n) + " row " + std::to_string(r) + " differs from vec_dot");
        }
    }
}

} // namespace

int main() {
    ggml_cpu_init();   // the CPU backend's fp16 tables, which the kernels' scale conversions read
    std::mt19937 rng_plain(11);
    for (auto [k, m] : std::vector<std::pair<int, int>>{{32, 5}, {544, 20}, {2048, 12}}) {
        run_plain_case(GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, k, m, rng_plain);
    }
    for (ggml_type t : {GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}) {
        for (auto [k, m] : std::vector<std::pair<int, int>>{{256, 7}, {1280, 20}}) {
            run_plain_case(t, GGML_TYPE_Q8_K, k, m, rng_plain);
        }
    }
    std::mt19937 rng(7);
    for (auto [k, m] : std::vector<std::pair<int, int>>{{32, 8}, {96, 24}, {544, 40}, {2048, 16}}) {
        if (!repack_buffer_type()) break;
        run_repacked_case(GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, k, m, rng);
    }
    for (auto [k, m] : std::vector<std::pair<int, int>>{{256, 8}, {768, 24}, {2048, 40}}) {
        if (!repack_buffer_type()) break;
        run_repacked_case(GGML_TYPE_Q4_K, GGML_TYPE_Q8_K, k, m, rng);
    }
    if (failures) {
        std::printf("%d checks failed\n", failures);
        return 1;
    }
    std::printf("PASSED\n");
    return 0;
}
