// Target context: creation, prefill, sampling, the plain decode step, rollback
// and the sliding-window guard. The MTP heads live in mtp.cpp.
#include "internal.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

double now_s() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

pmtp_session::pmtp_session() = default;
pmtp_session::~pmtp_session() = default;

namespace {

void validate_session_params(const pmtp_model * m, const pmtp_session_params & p) {
    if (!m->has_trunk) {
        fail(PMTP_ERR_INVALID_ARG, m->path + " is an MTP-only file; load the trunk model and pass this file as mtp=");
    }
    if (p.n_threads <= 0 || p.n_threads_batch <= 0) {
        fail(PMTP_ERR_INVALID_ARG, "threads must be >= 1 (got " + std::to_string(p.n_threads) + ", batch " +
             std::to_string(p.n_threads_batch) + ")");
    }
    if (p.n_batch == 0 || p.n_ubatch == 0) {
        fail(PMTP_ERR_INVALID_ARG, "n_batch and n_ubatch must be >= 1");
    }
    if (p.draft_max < 0 || p.draft_max > 8) {
        fail(PMTP_ERR_INVALID_ARG, "draft must be in [0, 8] (got " + std::to_string(p.draft_max) + ")");
    }
    if (p.flash_attn < -1 || p.flash_attn > 1) {
        fail(PMTP_ERR_INVALID_ARG, "flash_attn must be -1 (auto), 0 (off) or 1 (on)");
    }
    for (int32_t t : {p.type_k, p.type_v}) {
        if (t < -1 || t >= GGML_TYPE_COUNT) {
            fail(PMTP_ERR_INVALID_ARG, "KV cache type " + std::to_string(t) + " is not a ggml type");
        }
    }
    const int32_t n_ctx_train = llama_model_n_ctx_train(m->model.get());
    if (p.n_ctx > (uint32_t) std::max(n_ctx_train, 1) * 4u && p.n_ctx > 1u << 20) {
        fail(PMTP_ERR_INVALID_ARG, "n_ctx " + std::to_string(p.n_ctx) + " is far beyond what the model was trained for (" +
             std::to_string(n_ctx_train) + ")");
    }
}

// The whole verify batch of one sequence must sit in one ubatch (SWA hazard). Recurrent
// state keeps n_rs_seq = draft_max snapshots, and upstream's split_equal asserts (aborts
// the process) unless n_ubatch > n_rs_seq + 1, for every decode, so those need one more.
uint32_t ubatch_for(const pmtp_session_params & p, bool recurrent) {
    uint32_t n = p.n_ubatch;
    if (p.draft_max > 0 && !p.unsafe_split_verify) {
        n = std::max<uint32_t>(n, (uint32_t) p.draft_max + 1);
    }
    if (p.draft_max > 0 && recurrent) {
        n = std::max<uint32_t>(n, (uint32_t) p.draft_max + 2);
    }
    return n;
}

void rebuild_sampler_history(pmtp_session * s) {
    llama_sampler_reset(s->sampler.get());
    const int32_t last_n = s->sampling.penalty_last_n < 0 ? (int32_t) s->n_ctx : s->sampling.penalty_last_n;
    const size_t from = s->history.size() > (size_t) last_n ? s->history.size() - (size_t) last_n : 0;
    for (size_t i = from; i < s->history.size(); ++i) {
        llama_sampler_accept(s->sampler.get(), s->history[i]);
    }
}

}  // namespace

void session_create(pmtp_session * s, pmtp_model * model, const pmtp_session_params & p) {
    validate_session_params(model, p);
    s->model   = model;
    s->params  = p;
    s->n_vocab = n_vocab_of(model);
    s->n_embd  = llama_model_n_embd_out(model->model.get());
    s->n_swa   = llama_model_n_swa(model->model.get());
    s->recurrent = llama_model_is_recurrent(model->model.get()) || llama_model_is_hybrid(model->model.get());

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = p.n_ctx;
    cp.n_ubatch        = ubatch_for(p, s->recurrent);
    cp.n_batch         = std::max(p.n_batch, cp.n_ubatch);
    cp.n_seq_max       = 1;
    cp.n_threads       = p.n_threads;
    cp.n_threads_batch = p.n_threads_batch;
    cp.flash_attn_type = (llama_flash_attn_type) p.flash_attn;
    cp.no_perf         = true;
    cp.kv_unified      = true;
    cp.swa_full        = false;
    // Recurrent state can only be rolled back over as many tokens as it has snapshots.
    cp.n_rs_seq        = (uint32_t) p.draft_max;
    if (p.type_k >= 0) cp.type_k = (ggml_type) p.type_k;
    if (p.type_v >= 0) cp.type_v = (ggml_type) p.type_v;
    if (p.type_v >= 0 && ggml_is_quantized((ggml_type) p.type_v) && p.flash_attn == 0) {
        fail(PMTP_ERR_INVALID_ARG, "a quantized V cache needs flash attention (flash_attn=-1 or 1)");
    }

    rpc_check(model);
    s->ctx.reset(llama_init_from_model(model->model.get(), cp));
    if (!s->ctx) {
        fail(PMTP_ERR_OUT_OF_MEMORY, "could not create a context with n_ctx=" + std::to_string(p.n_ctx) +
             " (see the log); try a smaller n_ctx or a smaller KV cache type");
    }
    s->n_ctx    = llama_n_ctx(s->ctx.get());
    s->n_batch  = llama_n_batch(s->ctx.get());
    s->n_ubatch = llama_n_ubatch(s->ctx.get());
    s->batch.reset(llama_batch_ext_init(s->ctx.get()));
    s->sampling = pmtp_sampling_default();
    session_set_sampling(s, s->sampling);

    if (p.draft_max > 0) {
        llama_set_embeddings_nextn(s->ctx.get(), true, /*masked=*/ false);
        const pmtp_model * mtp_model = p.mtp_model ? p.mtp_model : model;
        mtp_heads_create(s, mtp_model, p.draft_max);
    }
}

void session_set_sampling(pmtp_session * s, const pmtp_sampling & sp) {
    auto finite = [](float x) { return std::isfinite(x); };
    if (!finite(sp.temperature) || !finite(sp.top_p) || !finite(sp.min_p) || !finite(sp.repeat_penalty) ||
        !finite(sp.presence_penalty) || !finite(sp.frequency_penalty)) {
        fail(PMTP_ERR_INVALID_ARG, "sampling values must be finite numbers");
    }
    if (sp.top_p <= 0.0f || sp.top_p > 1.0f) {
        fail(PMTP_ERR_INVALID_ARG, "top_p must be in (0, 1] (got " + std::to_string(sp.top_p) + ")");
    }
    if (sp.min_p < 0.0f || sp.min_p > 1.0f) {
        fail(PMTP_ERR_INVALID_ARG, "min_p must be in [0, 1] (got " + std::to_string(sp.min_p) + ")");
    }
    if (sp.repeat_penalty <= 0.0f) {
        fail(PMTP_ERR_INVALID_ARG, "repeat_penalty must be > 0 (1 = off)");
    }
    if (sp.penalty_last_n < -1) {
        fail(PMTP_ERR_INVALID_ARG, "penalty_last_n must be >= -1 (-1 = whole context)");
    }
    if (sp.n_logprobs < -1 || sp.n_logprobs > 20) {
        fail(PMTP_ERR_INVALID_ARG, "n_logprobs must be in [-1, 20] (-1 = off)");
    }
    if (sp.accept != 0 && sp.accept != 1) {
        fail(PMTP_ERR_INVALID_ARG, "accept must be 0 (match) or 1 (rejection sampling)");
    }

    llama_sampler_chain_params chp = llama_sampler_chain_default_params();
    chp.no_perf = true;
    sampler_ptr chain(llama_sampler_chain_init(chp));
    const bool penalties = sp.repeat_penalty != 1.0f || sp.presence_penalty != 0.0f || sp.frequency_penalty != 0.0f;
    if (penalties) {
        const int32_t last_n = sp.penalty_last_n < 0 ? (int32_t) s->n_ctx : sp.penalty_last_n;
        llama_sampler_chain_add(chain.get(), llama_sampler_init_penalties(
            s->n_vocab, last_n, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty));
    }
    if (sp.temperature <= 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
    } else {
        if (sp.top_k > 0)      llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(sp.top_k));
        if (sp.top_p < 1.0f)   llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(sp.top_p, 1));
        if (sp.min_p > 0.0f)   llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(sp.min_p, 1));
        llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(sp.temperature));
        llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(sp.seed));
    }
    if (penalties && sp.accept == 1 && sp.temperature > 0.0f && s->heads) {
        fail(PMTP_ERR_INVALID_ARG, "repeat/presence/frequency penalties with MTP at temperature > 0 need "
             "accept='match'; rejection sampling does not model them yet");
    }
    s->sampler  = std::move(chain);
    s->sampling = sp;
    seed_rng(s->rng, sp.seed == 0xFFFFFFFF ? std::random_device{}() : sp.seed);
    rebuild_sampler_history(s);
}

void target_decode(pmtp_session * s, const llama_token * tokens, size_t n, llama_pos pos0, bool all_logits) {
    if ((size_t) pos0 + n > s->n_ctx) {
        fail(PMTP_ERR_CONTEXT_FULL, "context is full: " + std::to_string(pos0) + " + " + std::to_string(n) +
             " tokens > n_ctx " + std::to_string(s->n_ctx) + "; create the model with a larger n_ctx");
    }
    llama_batch_ext * b = s->batch.get();
    llama_batch_ext_clear(b);
    for (size_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= s->n_vocab) {
            fail(PMTP_ERR_INVALID_ARG, "token id " + std::to_string(tokens[i]) + " is out of range [0, " +
                 std::to_string(s->n_vocab) + ")");
        }
        const int32_t idx = llama_batch_ext_add_token(b, 0, tokens[i]);
        const llama_pos pos = pos0 + (llama_pos) i;
        llama_batch_ext_set_pos(b, idx, &pos);
        if (all_logits || i + 1 == n) {
            llama_batch_ext_set_output_logits(b, idx, true);
        }
    }
    const int32_t rc = llama_process(s->ctx.get(), LLAMA_PROCESS_TYPE_DECODE, b);
    if (rc != 0) {
        // Fatal errors can leave processed ubatches behind: drop them so n_past stays true.
        llama_memory_seq_rm(s->mem(), 0, pos0, -1);
        s->logits_row = -1;
        if (rc == 1) {
            fail(PMTP_ERR_CONTEXT_FULL, "no room in the KV cache for " + std::to_string(n) + " tokens; use a larger n_ctx");
        }
        if (rc == 2) {
            fail(PMTP_ERR_ABORTED, "decode aborted");
        }
        fail(PMTP_ERR_DECODE, "llama_decode failed with status " + std::to_string(rc));
    }
    rpc_check_decode(s->model, s->ctx.get());
    s->logits_row = (int32_t) n - 1;
    s->n_last_decode = (int32_t) n;
}

void check_swa_window(pmtp_session * s) {
    if (s->n_swa <= 0 || !s->params.swa_guard) {
        return;
    }
    const llama_pos pos_max = llama_memory_seq_pos_max(s->mem(), 0);
    if (pos_max < 0) {
        return;
    }
    const llama_pos pos_min = llama_memory_seq_pos_min(s->mem(), 0);
    // The next token at pos_max + 1 attends to [pos_max + 2 - n_swa, pos_max + 1].
    const llama_pos need = std::max<llama_pos>(0, pos_max + 2 - s->n_swa);
    if (pos_min > need) {
        fail(PMTP_ERR_SWA_GUARD, "sliding-window cache lost positions [" + std::to_string(need) + ", " +
             std::to_string(pos_min) + ") that the next token attends to (window " + std::to_string(s->n_swa) + ")");
    }
}

void session_reset(pmtp_session * s) {
    llama_memory_clear(s->mem(), true);
    s->n_last_decode = 0;
    s->history.clear();
    s->pending    = -1;
    s->logits_row = -1;
    s->last_h.assign((size_t) s->n_embd, 0.0f);
    if (s->heads) {
        mtp_reset(s);
    }
    rebuild_sampler_history(s);
}

void session_prefill(pmtp_session * s, const llama_token * tokens, size_t n) {
    if (n == 0) {
        return;
    }
    if ((size_t) s->n_past() + n > s->n_ctx) {
        fail(PMTP_ERR_CONTEXT_FULL, "prompt of " + std::to_string(n) + " tokens does not fit: " +
             std::to_string(s->n_past()) + " already in a context of " + std::to_string(s->n_ctx) +
             "; shorten the prompt or create the model with a larger n_ctx");
    }
    if (s->pending >= 0 && s->heads) {
        mtp_rollback(s, s->n_past());  // forget the pending token's row
    }
    s->pending = -1;
    const double t0 = now_s();
    for (size_t off = 0; off < n; off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, n - off);
        const llama_pos pos0 = s->n_past();
        target_decode(s, tokens + off, m, pos0, false);
        s->history.insert(s->history.end(), tokens + off, tokens + off + m);
        if (s->heads) {
            const float * h = llama_get_embeddings_nextn(s->ctx.get());  // [m, n_embd]
            mtp_push_rows(s, tokens + off, s->last_h.data(), h, m, pos0);
            std::memcpy(s->last_h.data(), h + (m - 1) * (size_t) s->n_embd, sizeof(float) * (size_t) s->n_embd);
        }
        for (size_t i = off; i < off + m; ++i) {
            llama_sampler_accept(s->sampler.get(), tokens[i]);
        }
    }
    s->stats.t_prefill_s += now_s() - t0;
}

llama_token session_sample(pmtp_session * s, pmtp_step_result * out, int32_t i) {
    if (s->logits_row < 0) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to sample from: prefill a prompt first");
    }
    if (s->pending >= 0) {
        fail(PMTP_ERR_INVALID_ARG, "a sampled token is already pending; call step to decode it");
    }
    const double t0 = now_s();
    const llama_token t = llama_sampler_sample(s->sampler.get(), s->ctx.get(), s->logits_row);
    s->stats.t_sample_s += now_s() - t0;
    s->pending = t;
    out->tokens[i]     = t;
    out->from_draft[i] = false;
    out->n_tokens      = i + 1;
    fill_logprobs(s->sampling, llama_get_logits_ith(s->ctx.get(), s->logits_row), s->n_vocab, i, out);
    if (s->heads) {
        // Queue the pending token's row for the heads: it pairs with h[n_past - 1].
        mtp_push_rows(s, &t, s->last_h.data(), nullptr, 1, s->n_past());
    }
    return t;
}

void session_step_plain(pmtp_session * s, pmtp_step_result * out) {
    const llama_token t = s->pending;
    const llama_pos pos = s->n_past();
    const double t0 = now_s();
    target_decode(s, &t, 1, pos, false);
    s->history.push_back(t);
    s->pending = -1;
    s->stats.t_decode_s += now_s() - t0;
    if (s->heads) {
        const float * h = llama_get_embeddings_nextn_ith(s->ctx.get(), 0);
        std::memcpy(s->last_h.data(), h, sizeof(float) * (size_t) s->n_embd);
    }
    session_sample(s, out, 0);
    s->stats.n_emitted += 1;
}

namespace {

// How far back the recurrent state can go. The target keeps n_rs_seq + 1 = draft_max + 1
// snapshot slots, slot r holding the state r tokens before the end of the last ubatch, but
// only the last min(n_tokens, n_rs_seq + 1) of that ubatch's tokens are written (ggml's
// gated_delta_net / ssm conv: older slots keep whatever an earlier ubatch left there), so
// r must stay below the ubatch's token count. Upstream's seq_rm only checks r <= n_rs_seq
// and would restore a stale slot (e.g. two tokens back after a single-token decode).
int32_t rs_rollback_max(const pmtp_session * s) {
    const int32_t slots = s->params.draft_max + 1;
    // a decode longer than a ubatch keeps its trailing n_rs_seq + 1 tokens in its last ubatch
    // (split_equal's keep-tail) when a ubatch can hold them; assume nothing otherwise
    const int32_t n_ub = (int32_t) s->n_ubatch;
    const int32_t last_ubatch = s->n_last_decode <= n_ub ? s->n_last_decode : (n_ub >= slots ? slots : 1);
    return std::max(0, std::min(last_ubatch, slots) - 1);
}

}  // namespace

void session_rollback(pmtp_session * s, int32_t n_keep) {
    if (n_keep < 0 || n_keep > s->n_past()) {
        fail(PMTP_ERR_INVALID_ARG, "rollback to " + std::to_string(n_keep) + " outside [0, " + std::to_string(s->n_past()) + "]");
    }
    if (n_keep == 0) {
        session_reset(s);
        return;
    }
    if (n_keep == s->n_past()) {
        if (s->pending >= 0 && s->heads) {
            mtp_rollback(s, n_keep);
        }
        s->pending    = -1;
        return;
    }
    // With MTP the heads need h[n_keep - 1], which only a decode of that token gives back:
    // drop one more token from the target and decode it again.
    const int32_t n_target = s->heads ? n_keep - 1 : n_keep;
    const llama_token redo = s->history[(size_t) n_keep - 1];
    const bool snapshots_ok = !s->recurrent || s->n_past() - n_target <= rs_rollback_max(s);
    if (!snapshots_ok || !llama_memory_seq_rm(s->mem(), 0, n_target, -1)) {
        fail(PMTP_ERR_INVALID_ARG, "this model's state cannot be rolled back to " + std::to_string(n_keep) +
             " tokens (recurrent state); reset and prefill again");
    }
    s->history.resize((size_t) n_target);
    s->pending    = -1;
    s->logits_row = -1;
    check_swa_window(s);
    if (s->heads) {
        mtp_rollback(s, n_keep);
        target_decode(s, &redo, 1, n_target, false);
        s->history.push_back(redo);
        const float * h = llama_get_embeddings_nextn_ith(s->ctx.get(), 0);
        std::memcpy(s->last_h.data(), h, sizeof(float) * (size_t) s->n_embd);
    }
    rebuild_sampler_history(s);
}
