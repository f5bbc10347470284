// pmtp_probe_row_op: one of the per-token ops of a model's graph other than the matrix
// products and attention (norms, softmax, the MoE router's top-k and weight sum, the FFN's
// gate, RoPE) on n rows at once, on the CPU backend, so tests can check that each row gets
// the bits it gets when decoded alone, whatever the number of rows and threads: the backend
// splits rows over threads, and an op that split a row's reduction instead (or summed it
// in another order for another batch size) would make a verify batch inexact.
#include "probe.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <string>
#include <vector>

namespace {

using namespace probe;

// The op on x [ne0, n] (rope: [param, ne0 / param, n], one position per row).
ggml_tensor * build_op(ggml_context * ctx, int32_t op, ggml_tensor * x, ggml_tensor * mask, ggml_tensor * pos,
                       int32_t param) {
    switch (op) {
        case PMTP_ROW_RMS_NORM: return ggml_rms_norm(ctx, x, 1e-6f);
        case PMTP_ROW_NORM:     return ggml_norm(ctx, x, 1e-5f);
        case PMTP_ROW_L2_NORM:  return ggml_l2_norm(ctx, x, 1e-6f);
        case PMTP_ROW_SOFT_MAX: return ggml_soft_max_ext(ctx, x, mask, 0.125f, 0.0f);
        case PMTP_ROW_SUM_ROWS: return ggml_sum_rows(ctx, x);
        case PMTP_ROW_TOP_K:    return ggml_argsort_top_k(ctx, x, param);
        case PMTP_ROW_SWIGLU:   return ggml_swiglu(ctx, x);
        case PMTP_ROW_ROPE_NEOX:
            return ggml_rope_ext(ctx, x, pos, nullptr, param, GGML_ROPE_TYPE_NEOX, 0, 10000.0f, 1.0f,
                                 0.0f, 1.0f, 32.0f, 1.0f);
        default: fail(PMTP_ERR_INVALID_ARG, "unknown row op " + std::to_string(op));
    }
    return nullptr;
}

void check_shape(int32_t op, int64_t ne0, int64_t n, int32_t param, const float * mask, const int32_t * pos) {
    if (ne0 <= 0 || n <= 0) {
        fail(PMTP_ERR_INVALID_ARG, "ne0 and n must be positive");
    }
    if (op == PMTP_ROW_TOP_K && (param <= 0 || param > ne0)) {
        fail(PMTP_ERR_INVALID_ARG, "top-k needs 0 < k <= ne0");
    }
    if (op == PMTP_ROW_SWIGLU && ne0 % 2 != 0) {
        fail(PMTP_ERR_INVALID_ARG, "swiglu needs an even ne0 (gate and value halves)");
    }
    if (op == PMTP_ROW_ROPE_NEOX) {
        if (param <= 0 || param % 2 != 0 || ne0 % param != 0) {
            fail(PMTP_ERR_INVALID_ARG, "rope needs an even head size that divides ne0");
        }
        need(pos, "pos");
    }
    if (mask && op != PMTP_ROW_SOFT_MAX) {
        fail(PMTP_ERR_INVALID_ARG, "only soft_max takes a mask");
    }
}

} // namespace

int pmtp_probe_row_op(int32_t op, int64_t ne0, int64_t n, const float * x, const float * mask,
                      const int32_t * pos, int32_t param, int32_t n_threads, float * out) {
    return run_guarded([&] {
        need(x, "x");
        need(out, "out");
        check_shape(op, ne0, n, param, mask, pos);
        backend_ptr backend = cpu_backend(n_threads);

        ctx_ptr ctx = meta_ctx(8);
        ggml_tensor * xt = op == PMTP_ROW_ROPE_NEOX
            ? ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, param, ne0 / param, n)
            : ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, ne0, n);
        // a model's attention mask is F16, as is this one
        ggml_tensor * mt = mask ? ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F16, ne0, n) : nullptr;
        ggml_tensor * pt = op == PMTP_ROW_ROPE_NEOX ? ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n) : nullptr;
        ggml_tensor * yt = build_op(ctx.get(), op, xt, mt, pt, param);
        ggml_tensor * res = ggml_is_contiguous(yt) ? yt : ggml_cont(ctx.get(), yt);   // top-k: a view of argsort
        auto [gf, buf] = build_and_alloc(ctx.get(), res, backend.get());
        ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt));
        if (mt) {
            std::vector<ggml_fp16_t> m16((size_t) (ne0 * n));
            ggml_fp32_to_fp16_row(mask, m16.data(), ne0 * n);
            ggml_backend_tensor_set(mt, m16.data(), 0, ggml_nbytes(mt));
        }
        if (pt) {
            ggml_backend_tensor_set(pt, pos, 0, ggml_nbytes(pt));
        }
        compute_op(backend.get(), gf, yt, "row op");
        ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
    });
}
