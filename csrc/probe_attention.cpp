// pmtp_probe_flash_attn: one ggml flash-attention op on the CPU backend (or a named device), laid out the way a
// model's attention layer builds it (K/V as views of a cache-shaped tensor, permuted q, F16
// mask, F32 accumulation), so tests can check that n queries in one call give every query
// the bits a one-query call gives it.
#include "probe.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using namespace probe;

// Each dimension and each tensor's element count stays far below what would overflow the
// size arithmetic or exhaust memory; a probe is a test tool, not a workload.
constexpr int64_t MAX_DIM      = 1 << 20;
constexpr int64_t MAX_ELEMENTS = int64_t(1) << 26;

void check_args(int32_t kv_type, int64_t d_k, int64_t d_v, int64_t n_head, int64_t n_head_kv,
                int64_t n_kv, int64_t n_q, int32_t n_threads) {
    if (kv_type != GGML_TYPE_F16 && kv_type != GGML_TYPE_F32) {
        fail(PMTP_ERR_INVALID_ARG, "kv_type must be GGML_TYPE_F16 (1) or GGML_TYPE_F32 (0), got " +
             std::to_string(kv_type));
    }
    const struct { int64_t v; const char * name; } dims[] = {
        { d_k, "d_k" }, { d_v, "d_v" }, { n_head, "n_head" }, { n_head_kv, "n_head_kv" },
        { n_kv, "n_kv" }, { n_q, "n_q" },
    };
    for (const auto & d : dims) {
        if (d.v <= 0 || d.v > MAX_DIM) {
            fail(PMTP_ERR_INVALID_ARG, std::string(d.name) + " must be in 1.." + std::to_string(MAX_DIM) +
                 ", got " + std::to_string(d.v));
        }
    }
    if (n_head % n_head_kv != 0) {
        fail(PMTP_ERR_INVALID_ARG, "n_head (" + std::to_string(n_head) + ") must be a multiple of n_head_kv (" +
             std::to_string(n_head_kv) + ")");
    }
    // the largest products: q/out over n_q*n_head rows, k/v over n_kv*n_head_kv rows, the mask
    const int64_t d_max = d_k > d_v ? d_k : d_v;
    if (n_q * n_head > MAX_ELEMENTS / d_max || n_kv * n_head_kv > MAX_ELEMENTS / d_max ||
        n_q > MAX_ELEMENTS / n_kv) {
        fail(PMTP_ERR_INVALID_ARG, "the probe's tensors would exceed " + std::to_string(MAX_ELEMENTS) +
             " elements");
    }
    if (n_threads < 0) {
        fail(PMTP_ERR_INVALID_ARG, "n_threads must be >= 0 (0: the backend's default), got " +
             std::to_string(n_threads));
    }
}

} // namespace

int pmtp_probe_flash_attn(int32_t kv_type, int64_t d_k, int64_t d_v, int64_t n_head, int64_t n_head_kv,
                          int64_t n_kv, int64_t n_q, const float * q, const float * k, const float * v,
                          const float * mask, float scale, int32_t n_threads, float * out, const char * device) {
    return run_guarded([&] {
        need(q, "q");
        need(k, "k");
        need(v, "v");
        need(out, "out");
        check_args(kv_type, d_k, d_v, n_head, n_head_kv, n_kv, n_q, n_threads);
        const ggml_type kvt = (ggml_type) kv_type;

        ggml_backend_dev_t dev = nullptr;
        backend_ptr backend = device_backend(device, n_threads, &dev);

        // q, the K/V "cache" and the mask, plus the views, the op and the graph
        ctx_ptr ctx = meta_ctx(16);
        if (!ctx) {
            fail(PMTP_ERR_OUT_OF_MEMORY, "cannot create the probe's graph context");
        }
        ggml_context * c = ctx.get();

        // As the KV cache stores them: one row of d values per (position, KV head), the
        // heads of one position next to each other; the model reads them through
        // views permuted to [d, n_kv, n_head_kv].
        ggml_tensor * k_cache = ggml_new_tensor_3d(c, kvt, d_k, n_head_kv, n_kv);
        ggml_tensor * v_cache = ggml_new_tensor_3d(c, kvt, d_v, n_head_kv, n_kv);
        // As the attention layer gets q from its projection: [d_k, n_head, n_q].
        ggml_tensor * q_in = ggml_new_tensor_3d(c, GGML_TYPE_F32, d_k, n_head, n_q);
        // The models' flash-attention mask is F16, one row of n_kv per query. (This tree's
        // llama.cpp no longer pads the rows to GGML_KQ_MASK_PAD.)
        ggml_tensor * m_in = mask ? ggml_new_tensor_4d(c, GGML_TYPE_F16, n_kv, n_q, 1, 1) : nullptr;

        ggml_tensor * kv_k = ggml_view_4d(c, k_cache, d_k, n_head_kv, n_kv, 1,
                                          k_cache->nb[1], k_cache->nb[2], k_cache->nb[2] * n_kv, 0);
        ggml_tensor * kv_v = ggml_view_4d(c, v_cache, d_v, n_head_kv, n_kv, 1,
                                          v_cache->nb[1], v_cache->nb[2], v_cache->nb[2] * n_kv, 0);
        ggml_tensor * qp = ggml_permute(c, q_in, 0, 2, 1, 3);   // [d_k, n_q, n_head]
        ggml_tensor * kp = ggml_permute(c, kv_k, 0, 2, 1, 3);   // [d_k, n_kv, n_head_kv]
        ggml_tensor * vp = ggml_permute(c, kv_v, 0, 2, 1, 3);   // [d_v, n_kv, n_head_kv]

        ggml_tensor * fa = ggml_flash_attn_ext(c, qp, kp, vp, m_in, scale, 0.0f, 0.0f); // [d_v, n_head, n_q]
        ggml_prec_set_acc(fa, GGML_PREC_F32);

        auto [gf, buf] = build_and_alloc(c, fa, backend.get());

        auto store = [](ggml_tensor * t, const float * src, int64_t n) {
            if (t->type == GGML_TYPE_F32) {
                ggml_backend_tensor_set(t, src, 0, ggml_nbytes(t));
                return;
            }
            std::vector<ggml_fp16_t> half((size_t) n);
            ggml_fp32_to_fp16_row(src, half.data(), n);
            ggml_backend_tensor_set(t, half.data(), 0, ggml_nbytes(t));
        };
        store(k_cache, k, d_k * n_head_kv * n_kv);
        store(v_cache, v, d_v * n_head_kv * n_kv);
        store(q_in, q, d_k * n_head * n_q);
        if (m_in) {
            store(m_in, mask, n_kv * n_q);
        }

        compute_op(backend.get(), gf, fa, "flash attention");
        ggml_backend_tensor_get(fa, out, 0, ggml_nbytes(fa));
    });
}
