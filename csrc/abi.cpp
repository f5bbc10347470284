// The exported C functions: argument checks, C++ exceptions -> status codes,
// the thread-local last error, and llama.cpp's log routed to one callback.
#include "internal.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <sstream>

// rpc.cpp
size_t rpc_local_devices(pmtp_device_info * out, size_t cap);
size_t rpc_model_devices(const pmtp_model * m, pmtp_device_info * out, size_t cap);
void rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads, const char * const * names, size_t n_names);
bool rpc_version(int32_t * major, int32_t * minor, int32_t * patch);
void rpc_set_timeout(double seconds);

namespace {

thread_local std::string g_last_error;

std::mutex  g_log_mutex;
pmtp_log_fn g_log_fn   = nullptr;
void *      g_log_user = nullptr;
std::string g_last_llama_error;  // last ERROR line llama.cpp logged, for error messages
std::string g_log_partial;       // llama.cpp logs some lines in pieces (GGML_LOG_LEVEL_CONT)
int         g_log_level = 0;

void log_trampoline(ggml_log_level level, const char * text, void *) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (level != GGML_LOG_LEVEL_CONT) {
        g_log_level = level;
    }
    g_log_partial += text ? text : "";
    if (g_log_partial.empty() || g_log_partial.back() != '\n') {
        return;
    }
    g_log_partial.pop_back();
    if (g_log_level == GGML_LOG_LEVEL_ERROR) {
        // llama.cpp ends a failed load with a generic line; the reason comes before it
        static const std::string reason = "error loading model: ";
        const size_t at = g_log_partial.find(reason);
        if (at != std::string::npos) {
            g_last_llama_error = g_log_partial.substr(at + reason.size());
        } else if (g_last_llama_error.empty() || g_log_partial.find("failed to load model") == std::string::npos) {
            g_last_llama_error = g_log_partial;
        }
    }
    if (g_log_fn) {
        g_log_fn(g_log_level, g_log_partial.c_str(), g_log_user);
    }
    g_log_partial.clear();
}

thread_local int g_asserts_throw = 0;

// ggml_abort calls this, then abort(). Inside an asserts_throw scope it throws instead, so
// the abort is never reached: the exception unwinds through ggml_abort (C code built with
// unwind tables, the default on the platforms we build for) into llama.cpp's own catch.
void on_ggml_abort(const char * message) {
    if (g_asserts_throw > 0) {
        throw std::runtime_error(std::string("llama.cpp check failed: ") + message);
    }
    std::fprintf(stderr, "%s\n", message);
}

void init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_trampoline, nullptr);
        ggml_set_abort_callback(on_ggml_abort);
        llama_backend_init();
    });
}

template <typename F>
int guarded(F && f) {
    try {
        init_once();
        f();
        g_last_error.clear();
        return PMTP_OK;
    } catch (const pmtp_error & e) {
        g_last_error = e.what();
        return e.status;
    } catch (const std::bad_alloc &) {
        g_last_error = "out of memory";
        return PMTP_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        g_last_error = e.what();
        return PMTP_ERR_INTERNAL;
    } catch (...) {
        g_last_error = "unknown C++ exception";
        return PMTP_ERR_INTERNAL;
    }
}

void need(const void * p, const char * what) {
    if (!p) {
        fail(PMTP_ERR_INVALID_ARG, std::string(what) + " is NULL");
    }
}

int copy_out(const std::string & s, char * buf, size_t cap, size_t * n_out) {
    if (n_out) {
        *n_out = s.size();
    }
    if (!buf || cap < s.size() + 1) {
        fail(PMTP_ERR_BUFFER, "buffer of " + std::to_string(cap) + " bytes is too small for " +
             std::to_string(s.size() + 1));
    }
    std::memcpy(buf, s.data(), s.size());
    buf[s.size()] = '\0';
    return PMTP_OK;
}

std::string json_escape(const std::string & s) {
    std::string o;
    for (char c : s) {
        switch (c) {
            case '"':  o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n"; break;
            case '\t': o += "\\t"; break;
            default:
                if ((unsigned char) c < 0x20) {
                    char b[8];
                    std::snprintf(b, sizeof(b), "\\u%04x", c);
                    o += b;
                } else {
                    o += c;
                }
        }
    }
    return o;
}

std::string build_info_json() {
    std::ostringstream o;
    o << "{\"llama_cpp_commit\":\"0c1e57098\"";
    o << ",\"system_info\":\"" << json_escape(llama_print_system_info()) << "\"";
    o << ",\"gpu_offload\":" << (llama_supports_gpu_offload() ? "true" : "false");
    int32_t rpc_major = 0, rpc_minor = 0, rpc_patch = 0;
    const bool has_rpc = rpc_version(&rpc_major, &rpc_minor, &rpc_patch);
    o << ",\"rpc\":" << (has_rpc ? "true" : "false");
    o << ",\"rpc_protocol\":\"" << rpc_major << "." << rpc_minor << "." << rpc_patch << "\"";
    o << ",\"backends\":[";
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        o << (i ? "," : "") << "\"" << json_escape(ggml_backend_reg_name(ggml_backend_reg_get(i))) << "\"";
    }
    o << "],\"devices\":[";
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(d, &free, &total);
        o << (i ? "," : "") << "{\"name\":\"" << json_escape(ggml_backend_dev_name(d))
          << "\",\"description\":\"" << json_escape(ggml_backend_dev_description(d))
          << "\",\"memory_free\":" << free << ",\"memory_total\":" << total << "}";
    }
    o << "]}";
    return o.str();
}

}  // namespace

asserts_throw::asserts_throw() { ++g_asserts_throw; }
asserts_throw::~asserts_throw() { --g_asserts_throw; }

// The guard of every exported function, for those defined in other files (quantize.cpp).
int run_guarded(const std::function<void()> & f) { return guarded(f); }

std::string last_llama_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    return g_last_llama_error;
}

// model.cpp
pmtp_model * model_load(const char * path, const pmtp_model_params & p);
void model_info(const pmtp_model * m, pmtp_model_info * out);
std::string model_meta(const pmtp_model * m, const char * key);
std::vector<llama_token> tokenize(const pmtp_model * m, const char * text, size_t len, bool add_special, bool parse_special);
std::string token_piece(const pmtp_model * m, llama_token t, bool special);
std::string detokenize(const pmtp_model * m, const llama_token * toks, size_t n, bool remove_special, bool unparse_special);


extern "C" {

const char * pmtp_last_error(void) { return g_last_error.c_str(); }

void pmtp_set_log_callback(pmtp_log_fn fn, void * user) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log_fn   = fn;
    g_log_user = user;
}

int pmtp_build_info(char * buf, size_t cap, size_t * n_out) {
    return guarded([&] { copy_out(build_info_json(), buf, cap, n_out); });
}

pmtp_model_params pmtp_model_default_params(void) {
    pmtp_model_params p;
    std::memset(&p, 0, sizeof(p));
    p.n_gpu_layers = -1;
    p.split_mode   = 1;
    p.use_mmap     = true;
    return p;
}

int pmtp_model_load(const char * path, const pmtp_model_params * params, pmtp_model ** out) {
    return guarded([&] {
        need(params, "params");
        need(out, "out");
        *out = nullptr;
        {
            std::lock_guard<std::mutex> lock(g_log_mutex);
            g_last_llama_error.clear();
        }
        *out = model_load(path, *params);
    });
}

void pmtp_model_free(pmtp_model * model) { delete model; }

int pmtp_model_get_info(const pmtp_model * model, pmtp_model_info * out) {
    return guarded([&] {
        need(model, "model");
        need(out, "out");
        model_info(model, out);
    });
}

int pmtp_model_meta(const pmtp_model * model, const char * key, char * buf, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(model, "model");
        copy_out(model_meta(model, key), buf, cap, n_out);
    });
}

bool pmtp_token_is_eog(const pmtp_model * model, int32_t token) {
    return model && llama_vocab_is_eog(model->vocab(), token);
}

bool pmtp_token_is_control(const pmtp_model * model, int32_t token) {
    return model && token >= 0 && token < n_vocab_of(model) && llama_vocab_is_control(model->vocab(), token);
}

int pmtp_tokenize(const pmtp_model * model, const char * text, size_t len, bool add_special, bool parse_special,
                  int32_t * out, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(model, "model");
        if (len > 0) {
            need(text, "text");
        }
        const auto toks = tokenize(model, text ? text : "", len, add_special, parse_special);
        if (n_out) {
            *n_out = toks.size();
        }
        if (toks.size() > cap || (!out && !toks.empty())) {
            fail(PMTP_ERR_BUFFER, "token buffer too small");
        }
        std::copy(toks.begin(), toks.end(), out);
    });
}

int pmtp_vocab_pieces(const pmtp_model * model, bool special, char * buf, size_t cap, uint32_t * offsets, size_t * n_out) {
    return guarded([&] {
        need(model, "model");
        std::string all;
        const int32_t n = n_vocab_of(model);
        std::vector<uint32_t> offs((size_t) n + 1);
        for (int32_t t = 0; t < n; ++t) {
            offs[(size_t) t] = (uint32_t) all.size();
            all += token_piece(model, t, special);
        }
        offs[(size_t) n] = (uint32_t) all.size();
        if (n_out) {
            *n_out = all.size();
        }
        if (!buf) {
            return;
        }
        if (cap < all.size() || !offsets) {
            fail(PMTP_ERR_BUFFER, "pieces buffer too small");
        }
        std::memcpy(buf, all.data(), all.size());
        std::copy(offs.begin(), offs.end(), offsets);
    });
}

int pmtp_detokenize(const pmtp_model * model, const int32_t * tokens, size_t n, bool remove_special,
                    bool unparse_special, char * buf, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(model, "model");
        if (n > 0) {
            need(tokens, "tokens");
        }
        copy_out(detokenize(model, tokens, n, remove_special, unparse_special), buf, cap, n_out);
    });
}

pmtp_session_params pmtp_session_default_params(void) {
    pmtp_session_params p;
    std::memset(&p, 0, sizeof(p));
    p.n_ctx           = 4096;
    p.n_batch         = 512;
    p.n_ubatch        = 512;
    p.n_threads       = 4;
    p.n_threads_batch = 4;
    p.type_k          = -1;
    p.type_v          = -1;
    p.flash_attn      = -1;
    p.swa_guard       = true;
    p.n_seq_max       = 1;
    return p;
}

pmtp_sampling pmtp_sampling_default(void) {
    pmtp_sampling s;
    std::memset(&s, 0, sizeof(s));
    s.temperature       = 0.0f;
    s.top_k             = 40;
    s.top_p             = 0.95f;
    s.min_p             = 0.05f;
    s.repeat_penalty    = 1.0f;
    s.penalty_last_n    = 64;
    s.seed              = 0xFFFFFFFF;
    s.n_logprobs        = -1;
    s.accept            = 1;
    return s;
}

int pmtp_session_new(pmtp_model * model, const pmtp_session_params * params, pmtp_session ** out) {
    return guarded([&] {
        need(model, "model");
        need(params, "params");
        need(out, "out");
        *out = nullptr;
        auto s = std::make_unique<pmtp_session>();
        {
            std::lock_guard<std::mutex> lock(g_log_mutex);
            g_last_llama_error.clear();   // what a failed context creation logs explains it
        }
        session_create(s.get(), model, *params);
        for (seq_state & sq : s->seqs) {
            session_reset(s.get(), sq);
        }
        *out = s.release();
    });
}

void pmtp_session_free(pmtp_session * session) { delete session; }

int pmtp_session_set_sampling(pmtp_session * session, const pmtp_sampling * sampling) {
    return pmtp_seq_set_sampling(session, 0, sampling);
}

uint32_t pmtp_session_n_ctx(const pmtp_session * s)    { return s ? s->n_ctx : 0; }
uint32_t pmtp_session_n_ubatch(const pmtp_session * s) { return s ? s->n_ubatch : 0; }
int32_t  pmtp_session_n_past(const pmtp_session * s)   { return pmtp_seq_n_past(s, 0); }
uint64_t pmtp_session_graph_builds(const pmtp_session * s) { return s ? s->graph_builds : 0; }
int32_t  pmtp_session_draft_max(const pmtp_session * s) { return s && s->heads ? s->params.draft_max : 0; }
uint32_t pmtp_session_n_seq_max(const pmtp_session * s) { return s ? s->n_seq_max : 0; }
int32_t  pmtp_seq_n_past(const pmtp_session * s, int32_t seq) {
    return s && seq >= 0 && seq < (int32_t) s->seqs.size() ? s->seqs[(size_t) seq].n_past() : 0;
}

int pmtp_session_stats(const pmtp_session * session, pmtp_stats * out) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        *out = session->stats;
    });
}

void pmtp_session_stats_reset(pmtp_session * session) {
    if (session) {
        std::memset(&session->stats, 0, sizeof(session->stats));
    }
}

int pmtp_reset(pmtp_session * session) {
    return pmtp_seq_reset(session, 0);
}

int pmtp_seq_reset(pmtp_session * session, int32_t seq) {
    return guarded([&] {
        need(session, "session");
        session_reset(session, session->seq(seq));
    });
}

int pmtp_seq_mtp_catch_up(pmtp_session * session, int32_t seq) {
    return guarded([&] {
        need(session, "session");
        seq_state & sq = session->seq(seq);
        session_settle(session, sq);
        mtp_catch_up(session, sq);
    });
}

int pmtp_seq_mtp_window(pmtp_session * session, int32_t seq, int32_t n_rows) {
    return guarded([&] {
        need(session, "session");
        if (n_rows < 0) {
            fail(PMTP_ERR_INVALID_ARG, "n_rows must be >= 0 (0 feeds the MTP heads every row), got " +
                 std::to_string(n_rows));
        }
        seq_state & sq = session->seq(seq);
        if (session->heads) {
            mtp_set_window(session, sq, n_rows);
        }
    });
}

int32_t pmtp_seq_mtp_queued(const pmtp_session * s, int32_t seq) {
    return s && seq >= 0 && seq < (int32_t) s->seqs.size() ? mtp_queued(s, s->seqs[(size_t) seq]) : 0;
}

int pmtp_seq_set_sampling(pmtp_session * session, int32_t seq, const pmtp_sampling * sampling) {
    return guarded([&] {
        need(session, "session");
        need(sampling, "sampling");
        session_set_sampling(session, session->seq(seq), *sampling);
    });
}

int pmtp_rollback(pmtp_session * session, int32_t n_keep) {
    return pmtp_seq_rollback(session, 0, n_keep);
}

int pmtp_seq_rollback(pmtp_session * session, int32_t seq, int32_t n_keep) {
    return guarded([&] {
        need(session, "session");
        session_rollback(session, session->seq(seq), n_keep);
    });
}

int pmtp_prefill(pmtp_session * session, const int32_t * tokens, size_t n) {
    return pmtp_seq_prefill(session, 0, tokens, n);
}

int pmtp_seq_prefill(pmtp_session * session, int32_t seq, const int32_t * tokens, size_t n) {
    return guarded([&] {
        need(session, "session");
        if (n > 0) {
            need(tokens, "tokens");
        }
        session_prefill(session, session->seq(seq), tokens, n);
    });
}

int pmtp_logits(pmtp_session * session, float * out, size_t cap) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        session_settle(session, session->seqs[0]);   // a rollback's deferred decode gives them
        const seq_state & sq = session->seqs[0];
        if (sq.logits_row < 0 || sq.logits_decode != session->n_decodes) {
            fail(PMTP_ERR_INVALID_ARG, "no logits: prefill first");
        }
        if (cap < (size_t) session->n_vocab) {
            fail(PMTP_ERR_BUFFER, "logits buffer needs n_vocab floats");
        }
        const float * l = llama_get_logits_ith(session->ctx.get(), sq.logits_row);
        std::memcpy(out, l, sizeof(float) * (size_t) session->n_vocab);
    });
}

int pmtp_sample(pmtp_session * session, pmtp_step_result * out) {
    return pmtp_seq_sample(session, 0, out);
}

int pmtp_seq_sample(pmtp_session * session, int32_t seq, pmtp_step_result * out) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        std::memset(out, 0, sizeof(*out));
        session_sample(session, session->seq(seq), out, 0);
    });
}

int pmtp_step(pmtp_session * session, int32_t draft, pmtp_step_result * out) {
    const int32_t seq = 0;
    return pmtp_step_batch(session, &seq, &draft, 1, out);
}

int pmtp_step_batch(pmtp_session * session, const int32_t * seqs, const int32_t * drafts, size_t n,
                    pmtp_step_result * out) {
    return guarded([&] {
        need(session, "session");
        need(seqs, "seqs");
        need(drafts, "drafts");
        need(out, "out");
        session_step(session, seqs, drafts, n, out);
    });
}

int pmtp_draft(pmtp_session * session, int32_t k, int32_t * out, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        if (!session->heads) {
            fail(PMTP_ERR_MTP, "this session has no MTP heads (draft_max = 0)");
        }
        if (k < 1 || k > session->params.draft_max || (size_t) k > cap) {
            fail(PMTP_ERR_INVALID_ARG, "draft k must be in [1, " + std::to_string(session->params.draft_max) + "]");
        }
        llama_token buf[PMTP_MAX_DRAFT];
        mtp_draft(session, {&session->seqs[0]}, {k}, buf);
        std::copy(buf, buf + k, out);
        if (n_out) {
            *n_out = (size_t) k;
        }
    });
}

int pmtp_head_logits(const pmtp_session * session, int32_t head, float * out, size_t cap) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        if (!session->heads) {
            fail(PMTP_ERR_MTP, "this session has no MTP heads (draft_max = 0)");
        }
        if (cap < (size_t) session->n_vocab) {
            fail(PMTP_ERR_BUFFER, "logits buffer of " + std::to_string(cap) + " floats is smaller than n_vocab " +
                 std::to_string(session->n_vocab));
        }
        std::memcpy(out, mtp_head_logits(session, head), sizeof(float) * (size_t) session->n_vocab);
    });
}

int pmtp_verify(pmtp_session * session, const int32_t * drafts, size_t n, pmtp_step_result * out) {
    return guarded([&] {
        need(session, "session");
        need(out, "out");
        std::memset(out, 0, sizeof(*out));
        if (!session->heads) {
            fail(PMTP_ERR_MTP, "this session has no MTP heads (draft_max = 0)");
        }
        if (n > (size_t) session->params.draft_max || (n > 0 && !drafts)) {
            fail(PMTP_ERR_INVALID_ARG, "at most draft_max drafts can be verified");
        }
        for (size_t i = 0; i < n; ++i) {
            if (drafts[i] < 0 || drafts[i] >= session->n_vocab) {
                fail(PMTP_ERR_INVALID_ARG, "draft token " + std::to_string(drafts[i]) + " out of range");
            }
        }
        session_verify(session, session->seqs[0], drafts, n, out);
    });
}

int pmtp_rejection_verify(const float * p, const float * q, const int32_t * drafts, size_t n, int32_t n_vocab,
                          uint64_t seed, int32_t * out_tokens, int32_t * n_accepted) {
    return guarded([&] {
        need(p, "p");
        need(out_tokens, "out_tokens");
        need(n_accepted, "n_accepted");
        if (n > 0) {
            need(q, "q");
            need(drafts, "drafts");
        }
        if (n_vocab <= 0) {
            fail(PMTP_ERR_INVALID_ARG, "n_vocab must be > 0");
        }
        for (size_t j = 0; j < n; ++j) {
            if (drafts[j] < 0 || drafts[j] >= n_vocab) {
                fail(PMTP_ERR_INVALID_ARG, "draft token out of range");
            }
        }
        std::mt19937_64 rng;
        seed_rng(rng, seed);
        llama_token next = -1;
        const size_t n_acc = rejection_verify(p, q, drafts, n, n_vocab, rng, next);
        std::copy(drafts, drafts + n_acc, out_tokens);
        out_tokens[n_acc] = next;
        *n_accepted = (int32_t) n_acc;
    });
}

int pmtp_sampling_probs(const pmtp_sampling * sampling, const float * logits, int32_t n_vocab, float * probs) {
    return guarded([&] {
        need(sampling, "sampling");
        need(logits, "logits");
        need(probs, "probs");
        if (n_vocab <= 0) {
            fail(PMTP_ERR_INVALID_ARG, "n_vocab must be > 0");
        }
        sampling_probs(*sampling, logits, n_vocab, probs);
    });
}

bool pmtp_rpc_version(int32_t * major, int32_t * minor, int32_t * patch) {
    return rpc_version(major, minor, patch);
}

int pmtp_rpc_set_timeout(double seconds) {
    return guarded([&] { rpc_set_timeout(seconds); });
}

int pmtp_local_devices(pmtp_device_info * out, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(n_out, "n_out");
        *n_out = rpc_local_devices(out, cap);
    });
}

int pmtp_model_devices(const pmtp_model * model, pmtp_device_info * out, size_t cap, size_t * n_out) {
    return guarded([&] {
        need(model, "model");
        need(n_out, "n_out");
        *n_out = rpc_model_devices(model, out, cap);
    });
}

int pmtp_rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads,
                   const char * const * device_names, size_t n_devices) {
    return guarded([&] { rpc_serve(endpoint, cache_dir, n_threads, device_names, n_devices); });
}

}  // extern "C"
