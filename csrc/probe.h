// What the kernel probes (probe_matmul.cpp, probe_attention.cpp, probe_rows.cpp) share: owning handles for
// ggml objects and a backend (the CPU with a thread count, or a named device such as CUDA0).
// Test tools, not part of the engine.
#pragma once

#include "internal.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <functional>
#include <memory>
#include <string>

int run_guarded(const std::function<void()> & f);   // abi.cpp

namespace probe {

struct ctx_deleter     { void operator()(ggml_context * c) const { ggml_free(c); } };
struct buffer_deleter  { void operator()(ggml_backend_buffer * b) const { ggml_backend_buffer_free(b); } };
struct backend_deleter { void operator()(ggml_backend * b) const { ggml_backend_free(b); } };
using ctx_ptr     = std::unique_ptr<ggml_context, ctx_deleter>;
using buffer_ptr  = std::unique_ptr<ggml_backend_buffer, buffer_deleter>;
using backend_ptr = std::unique_ptr<ggml_backend, backend_deleter>;

// A context for a probe's tensor and graph metadata (the data lives in backend buffers).
inline ctx_ptr meta_ctx(size_t n_tensors) {
    ggml_init_params ip = { ggml_tensor_overhead() * n_tensors + ggml_graph_overhead(), nullptr, true };
    return ctx_ptr(ggml_init(ip));
}

inline void need(const void * p, const char * what) {
    if (!p) {
        fail(PMTP_ERR_INVALID_ARG, std::string(what) + " is NULL");
    }
}

// The CPU device and a backend on it running n_threads threads (<= 0: the default).
inline backend_ptr cpu_backend(int32_t n_threads, ggml_backend_dev_t * dev_out = nullptr) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) {
        fail(PMTP_ERR_INTERNAL, "no CPU backend");
    }
    backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        fail(PMTP_ERR_INTERNAL, "cannot start the CPU backend");
    }
    auto set_threads = (ggml_backend_set_n_threads_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_set_n_threads");
    if (set_threads && n_threads > 0) {
        set_threads(backend.get(), n_threads);
    }
    if (dev_out) {
        *dev_out = dev;
    }
    return backend;
}

// The backend a probe runs on: the CPU when `device` is NULL or empty, else the device of
// that name (as ggml_backend_dev_name gives it, e.g. "CUDA0"); an unknown name is an error
// that lists the devices this build has.
inline backend_ptr device_backend(const char * device, int32_t n_threads, ggml_backend_dev_t * dev_out = nullptr) {
    if (!device || !*device) {
        return cpu_backend(n_threads, dev_out);
    }
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(device);
    if (!dev) {
        std::string known;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            known += (known.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(ggml_backend_dev_get(i)));
        }
        fail(PMTP_ERR_INVALID_ARG, std::string("no device named '") + device + "' in this build (devices: " +
             known + ")");
    }
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return cpu_backend(n_threads, dev_out);
    }
    backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        fail(PMTP_ERR_INTERNAL, std::string("cannot start the backend of device ") + device);
    }
    if (dev_out) {
        *dev_out = dev;
    }
    return backend;
}

// A probe's graph computing `result`, with every tensor of `ctx` placed in one buffer of
// `backend` (`buf` owns it).
struct graph_in_buffer {
    ggml_cgraph * gf;
    buffer_ptr    buf;
};
inline graph_in_buffer build_and_alloc(ggml_context * ctx, ggml_tensor * result, ggml_backend_t backend) {
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, result);
    buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx, backend));
    if (!buf) {
        fail(PMTP_ERR_OUT_OF_MEMORY, "cannot allocate the probe's tensors");
    }
    return {gf, std::move(buf)};
}

// Compute a probe's graph after checking that the backend runs its one op (a GPU backend
// aborts on an op it does not support instead of returning an error).
inline void compute_op(ggml_backend_t backend, ggml_cgraph * gf, ggml_tensor * op, const char * what) {
    if (!ggml_backend_supports_op(backend, op)) {
        fail(PMTP_ERR_INVALID_ARG, std::string(ggml_backend_name(backend)) + " does not run this " + what +
             " (type or shape not supported there)");
    }
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fail(PMTP_ERR_INTERNAL, std::string("the probe's ") + what + " failed");
    }
}

} // namespace probe
