// RPC: a model whose layers are spread over worker hosts (client side), and serving this
// host's devices to such clients (worker side). ggml's RPC backend does the transport; the
// pinned tree is patched (vendor/patches/0004) so a lost worker is recorded instead of
// aborting the process, and this file turns those records into PMTP_ERR_RPC.
#include "internal.h"

#include "ggml-backend.h"
#ifdef PMTP_HAVE_RPC
#include "ggml-rpc.h"
#endif

#include <cmath>
#include <cstring>

namespace {

[[noreturn]] void no_rpc() {
    fail(PMTP_ERR_RPC, "this build has no RPC backend; rebuild with GGML_RPC=ON");
}

#ifdef PMTP_HAVE_RPC
uint64_t failures_of(const std::string & endpoint, std::string * last = nullptr) {
    char buf[512];
    const uint64_t n = ggml_backend_rpc_get_failures(endpoint.c_str(), buf, sizeof(buf));
    if (last) {
        *last = buf;
    }
    return n;
}
#endif

void check_endpoint(const std::string & ep) {
    const size_t colon = ep.rfind(':');
    if (ep.empty() || colon == std::string::npos || colon == 0 || colon + 1 == ep.size()) {
        fail(PMTP_ERR_INVALID_ARG, "RPC endpoint '" + ep + "' is not host:port (e.g. 192.168.1.20:50052)");
    }
    for (size_t i = colon + 1; i < ep.size(); ++i) {
        if (ep[i] < '0' || ep[i] > '9') {
            fail(PMTP_ERR_INVALID_ARG, "RPC endpoint '" + ep + "' has a port that is not a number");
        }
    }
    const long port = std::strtol(ep.c_str() + colon + 1, nullptr, 10);
    if (port < 1 || port > 65535) {
        fail(PMTP_ERR_INVALID_ARG, "RPC endpoint '" + ep + "' has a port outside 1..65535");
    }
}

bool is_local_gpu(ggml_backend_dev_t d) {
    const auto t = ggml_backend_dev_type(d);
    return t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU;
}

void fill_device(ggml_backend_dev_t d, const std::string & endpoint, pmtp_device_info * out) {
    std::memset(out, 0, sizeof(*out));
    std::snprintf(out->name, sizeof(out->name), "%s", ggml_backend_dev_name(d));
    std::snprintf(out->description, sizeof(out->description), "%s", ggml_backend_dev_description(d));
    std::snprintf(out->endpoint, sizeof(out->endpoint), "%s", endpoint.c_str());
    out->type = (int32_t) ggml_backend_dev_type(d);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(d, &free, &total);
    out->memory_free  = free;
    out->memory_total = total;
}

}  // namespace

void rpc_prepare(pmtp_model * m, const pmtp_model_params & p) {
    if (p.n_rpc_servers == 0) {
        return;
    }
    if (!p.rpc_servers) {
        fail(PMTP_ERR_INVALID_ARG, "rpc_servers is NULL but n_rpc_servers > 0");
    }
    if (p.mtp_placement < 0 || p.mtp_placement > 1) {
        fail(PMTP_ERR_INVALID_ARG, "mtp_placement must be 0 (local) or 1 (layer split)");
    }
#ifdef PMTP_HAVE_RPC
    for (size_t i = 0; i < p.n_rpc_servers; ++i) {
        const std::string ep = p.rpc_servers[i] ? p.rpc_servers[i] : "";
        check_endpoint(ep);
        for (const auto & seen : m->rpc_endpoints) {
            if (seen == ep) {
                fail(PMTP_ERR_INVALID_ARG, "RPC endpoint " + ep + " is listed twice");
            }
        }
        const uint64_t before = failures_of(ep);
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(ep.c_str());
        std::string why;
        if (failures_of(ep, &why) != before || !reg) {
            fail(PMTP_ERR_RPC, "RPC worker " + (why.empty() ? ep + ": serves no devices" : why));
        }
        m->rpc_endpoints.push_back(ep);
        for (size_t j = 0; j < ggml_backend_reg_dev_count(reg); ++j) {
            m->devices.push_back(ggml_backend_reg_dev_get(reg, j));
        }
    }
    // Local GPUs follow the workers' devices (llama.cpp's own order for --rpc).
    ggml_backend_dev_t local_gpu = nullptr;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (is_local_gpu(d)) {
            m->devices.push_back(d);
            local_gpu = local_gpu ? local_gpu : d;
        }
    }
    m->devices.push_back(nullptr);
    // Drafting on this host: each drafted token would otherwise cost network round trips.
    // A model with MTP layers loaded without them (mtp=False) places its output layer the
    // same way, so that its logits have the bits the MTP configuration's have (another
    // device sums the output layer in another order) and plain and MTP output stay equal.
    if (p.mtp_placement == 0 && m->n_layer_mtp > 0) {
        m->mtp_device = local_gpu ? local_gpu : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    for (const auto & ep : m->rpc_endpoints) {
        m->rpc_failures.push_back(failures_of(ep));
    }
#else
    (void) m;
    no_rpc();
#endif
}

void rpc_check(const pmtp_model * m) {
    if (m->rpc_endpoints.empty()) {
        return;
    }
    if (!m->rpc_lost.empty()) {
        fail(PMTP_ERR_RPC, m->rpc_lost);
    }
#ifdef PMTP_HAVE_RPC
    for (size_t i = 0; i < m->rpc_endpoints.size(); ++i) {
        std::string why;
        if (failures_of(m->rpc_endpoints[i], &why) != m->rpc_failures[i]) {
            m->rpc_lost = "RPC worker " + why + "; this model cannot be used any more: close it and load it again";
            fail(PMTP_ERR_RPC, m->rpc_lost);
        }
    }
#endif
}

void rpc_check_decode(const pmtp_model * m, llama_context * ctx) {
    if (m->rpc_endpoints.empty()) {
        return;
    }
    llama_synchronize(ctx);
    rpc_check(m);
}

// ------------------------------------------------ what abi.cpp exports

namespace {

using device_list = std::vector<std::pair<ggml_backend_dev_t, std::string>>;  // device, endpoint

device_list local_devices() {
    device_list out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        out.emplace_back(ggml_backend_dev_get(i), "");
    }
    return out;
}

size_t copy_devices(const device_list & devs, pmtp_device_info * out, size_t cap) {
    for (size_t i = 0; i < devs.size() && out && i < cap; ++i) {
        fill_device(devs[i].first, devs[i].second, &out[i]);
    }
    return devs.size();
}

bool is_rpc_device(ggml_backend_dev_t d) {
    return std::strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(d)), "RPC") == 0;
}

}  // namespace

size_t rpc_local_devices(pmtp_device_info * out, size_t cap) {
    return copy_devices(local_devices(), out, cap);
}

size_t rpc_model_devices(const pmtp_model * m, pmtp_device_info * out, size_t cap) {
    device_list devs;
    devs.emplace_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), "");
    if (m->devices.empty()) {  // no workers: llama.cpp uses every local GPU
        for (const auto & kv : local_devices()) {
            if (is_local_gpu(kv.first)) {
                devs.push_back(kv);
            }
        }
    }
    for (ggml_backend_dev_t d : m->devices) {
        if (d) {
            // the RPC backend describes each of a worker's devices by the worker's endpoint;
            // a lost worker reports zero memory (the patched client answers without it)
            devs.emplace_back(d, is_rpc_device(d) ? ggml_backend_dev_description(d) : "");
        }
    }
    return copy_devices(devs, out, cap);
}

void rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads,
               const char * const * names, size_t n_names) {
#ifdef PMTP_HAVE_RPC
    const std::string ep = endpoint ? endpoint : "";
    check_endpoint(ep);
    if (n_threads <= 0) {
        fail(PMTP_ERR_INVALID_ARG, "n_threads must be > 0");
    }
    std::vector<ggml_backend_dev_t> devs;
    for (size_t i = 0; i < n_names; ++i) {
        ggml_backend_dev_t d = names && names[i] ? ggml_backend_dev_by_name(names[i]) : nullptr;
        if (!d) {
            std::string known;
            for (const auto & kv : local_devices()) {
                known += (known.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(kv.first));
            }
            fail(PMTP_ERR_INVALID_ARG, std::string("no device named '") + (names && names[i] ? names[i] : "") +
                 "' on this host; devices: " + known);
        }
        devs.push_back(d);
    }
    if (devs.empty()) {
        for (const auto & kv : local_devices()) {
            if (is_local_gpu(kv.first)) {
                devs.push_back(kv.first);
            }
        }
    }
    if (devs.empty()) {
        devs.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    }
    ggml_backend_rpc_start_server(ep.c_str(), cache_dir && *cache_dir ? cache_dir : nullptr,
                                  (size_t) n_threads, devs.size(), devs.data());
    fail(PMTP_ERR_RPC, "the RPC worker could not serve on " + ep +
         " (address not local, port in use, or the device failed to start; see the log)");
#else
    (void) endpoint; (void) cache_dir; (void) n_threads; (void) names; (void) n_names;
    no_rpc();
#endif
}

bool rpc_version(int32_t * major, int32_t * minor, int32_t * patch) {
#ifdef PMTP_HAVE_RPC
    if (major) *major = RPC_PROTO_MAJOR_VERSION;
    if (minor) *minor = RPC_PROTO_MINOR_VERSION;
    if (patch) *patch = RPC_PROTO_PATCH_VERSION;
    return true;
#else
    if (major) *major = 0;
    if (minor) *minor = 0;
    if (patch) *patch = 0;
    return false;
#endif
}

void rpc_set_timeout(double seconds) {
    if (!std::isfinite(seconds) || seconds < 0 || seconds > 86400.0 * 7) {
        fail(PMTP_ERR_INVALID_ARG, "rpc timeout must be between 0 (none) and one week, in seconds");
    }
#ifdef PMTP_HAVE_RPC
    ggml_backend_rpc_set_timeout((uint32_t) std::llround(seconds * 1000.0));
#else
    no_rpc();
#endif
}
