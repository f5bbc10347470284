// What the kernel probes (probe_matmul.cpp, probe_attention.cpp) share: owning handles for
// ggml objects and a CPU backend with a thread count. Test tools, not part of the engine.
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

} // namespace probe
