// pmtp_probe_mul_mat: one ggml matrix product on the CPU backend (or a named device), set up
// the way a loaded model's weights are (same type conversion, same repacking buffer on the
// CPU), so tests can check that an n-row product gives every row the bits a one-row product
// gives it.
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

// The CPU's repacking buffer type ("CPU_REPACK"), or null where this build has none.
ggml_backend_buffer_type_t repack_buffer_type(ggml_backend_dev_t dev) {
    auto reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) {
        return nullptr;
    }
    for (auto * bt = get_extra(dev); bt && *bt; ++bt) {
        if (std::strcmp(ggml_backend_buft_name(*bt), "CPU_REPACK") == 0) {
            return *bt;
        }
    }
    return nullptr;
}

// The weight as the model loader stores it: f32 rows converted to `type`.
std::vector<uint8_t> convert_rows(ggml_type type, const float * w, int64_t m, int64_t k) {
    std::vector<uint8_t> data(ggml_row_size(type, k) * (size_t) m);
    if (type == GGML_TYPE_F32) {
        std::memcpy(data.data(), w, data.size());
    } else {
        ggml_quantize_chunk(type, w, data.data(), 0, m, k, nullptr);
    }
    return data;
}

void check_args(int32_t type, int64_t k, int64_t m, int64_t n) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_get_type_traits((ggml_type) type)->blck_size == 0) {
        fail(PMTP_ERR_INVALID_ARG, "unknown ggml type " + std::to_string(type));
    }
    if (ggml_quantize_requires_imatrix((ggml_type) type)) {
        fail(PMTP_ERR_INVALID_ARG, std::string("type ") + ggml_type_name((ggml_type) type) + " needs an importance matrix");
    }
    if (k <= 0 || m <= 0 || n <= 0 || k % ggml_blck_size((ggml_type) type) != 0) {
        fail(PMTP_ERR_INVALID_ARG, "k, m, n must be positive and k a multiple of the type's block size " +
             std::to_string(ggml_blck_size((ggml_type) type)));
    }
}

} // namespace

int pmtp_probe_mul_mat(int32_t type, int64_t k, int64_t m, int64_t n, const float * w, const float * x,
                       bool repack, int32_t n_threads, float * out, bool * repacked, const char * device) {
    return run_guarded([&] {
        need(w, "w");
        need(x, "x");
        need(out, "out");
        check_args(type, k, m, n);
        const ggml_type wtype = (ggml_type) type;
        ggml_backend_dev_t dev = nullptr;
        backend_ptr backend = device_backend(device, n_threads, &dev);
        const bool on_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;

        // The weight: in the repacking buffer when asked for and the type has a layout there
        // (its init gives the tensor the repacked traits), else in a plain CPU buffer.
        ctx_ptr wctx = meta_ctx(1);
        ggml_tensor * wt = ggml_new_tensor_2d(wctx.get(), wtype, k, m);
        buffer_ptr wbuf;
        ggml_backend_buffer_type_t rbt = repack && on_cpu ? repack_buffer_type(dev) : nullptr;
        if (rbt) {
            wbuf.reset(ggml_backend_alloc_ctx_tensors_from_buft(wctx.get(), rbt));
            if (wbuf && wt->extra == nullptr) {
                wbuf.reset();
                wt->buffer = nullptr;
                wt->data   = nullptr;
            }
        }
        const bool in_repack = (bool) wbuf;
        if (!wbuf) {
            wbuf.reset(ggml_backend_alloc_ctx_tensors(wctx.get(), backend.get()));
        }
        if (!wbuf) {
            fail(PMTP_ERR_OUT_OF_MEMORY, "cannot allocate the probe weight");
        }
        std::vector<uint8_t> wdata = convert_rows(wtype, w, m, k);
        ggml_backend_tensor_set(wt, wdata.data(), 0, wdata.size());

        ctx_ptr gctx = meta_ctx(3);
        ggml_tensor * xt = ggml_new_tensor_2d(gctx.get(), GGML_TYPE_F32, k, n);
        ggml_tensor * yt = ggml_mul_mat(gctx.get(), wt, xt); // [m, n]
        auto [gf, gbuf] = build_and_alloc(gctx.get(), yt, backend.get());
        ggml_backend_tensor_set(xt, x, 0, ggml_nbytes(xt));
        compute_op(backend.get(), gf, yt, "matmul");
        ggml_backend_tensor_get(yt, out, 0, ggml_nbytes(yt));
        if (repacked) {
            *repacked = in_repack;
        }
    });
}
