// Target context: creation, prefill, sampling, rollback and the sliding-window
// guard, per sequence. The MTP heads live in mtp.cpp, the step in step.cpp.
//
// A session with n_seq_max = N > 1 decodes N sequences in one target context.
// Each sequence gets its own KV stream (kv_unified = false): its cells are laid
// out exactly as in a context of its own, whatever the other sequences do, so
// flash attention (which skips masked cells) sums its rows in the same order and
// a row's numbers do not depend on the batch it was decoded in.
#include "internal.h"

std::string last_llama_error();  // abi.cpp

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

seq_state & pmtp_session::seq(int32_t id) {
    if (id < 0 || id >= (int32_t) seqs.size()) {
        fail(PMTP_ERR_INVALID_ARG, "sequence id " + std::to_string(id) + " outside [0, " +
             std::to_string(seqs.size()) + "); the session was created with n_seq_max = " + std::to_string(seqs.size()));
    }
    return seqs[(size_t) id];
}

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
    if (p.draft_max < 0 || p.draft_max > PMTP_MAX_DRAFT) {
        fail(PMTP_ERR_INVALID_ARG, "draft must be in [0, " + std::to_string(PMTP_MAX_DRAFT) + "] (got " +
                                   std::to_string(p.draft_max) + ")");
    }
    if (p.flash_attn < -1 || p.flash_attn > 1) {
        fail(PMTP_ERR_INVALID_ARG, "flash_attn must be -1 (auto), 0 (off) or 1 (on)");
    }
    for (int32_t t : {p.type_k, p.type_v}) {
        if (t < -1 || t >= GGML_TYPE_COUNT) {
            fail(PMTP_ERR_INVALID_ARG, "KV cache type " + std::to_string(t) + " is not a ggml type");
        }
    }
    if (p.n_seq_max < 1 || p.n_seq_max > PMTP_MAX_SEQUENCES) {
        fail(PMTP_ERR_INVALID_ARG, "n_seq_max must be in [1, " + std::to_string(PMTP_MAX_SEQUENCES) + "] (got " +
                                   std::to_string(p.n_seq_max) + ")");
    }
    if (p.n_seq_max > 1) {
        if (p.flash_attn == 0) {
            fail(PMTP_ERR_INVALID_ARG, "n_seq_max > 1 needs flash attention (flash_attn=-1 or 1): without it a "
                 "row's attention sums depend on the other sequences' cache use, and greedy output would too");
        }
        if (p.unsafe_split_verify) {
            fail(PMTP_ERR_INVALID_ARG, "unsafe_split_verify is for single-sequence tests only");
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
// With several sequences, one decode holds up to k_rows_exact rows of whole verify
// batches, all in one ubatch.
uint32_t ubatch_for(const pmtp_session_params & p, bool recurrent) {
    uint32_t n = p.n_ubatch;
    if (p.draft_max > 0 && !p.unsafe_split_verify) {
        n = std::max<uint32_t>(n, (uint32_t) p.draft_max + 1);
    }
    if (p.n_seq_max > 1) {
        const uint32_t rows = (uint32_t) p.n_seq_max * (uint32_t) (p.draft_max + 1);
        n = std::max<uint32_t>(n, std::min<uint32_t>(rows, (uint32_t) k_rows_exact));
    }
    if (p.draft_max > 0 && recurrent) {
        n = std::max<uint32_t>(n, (uint32_t) p.draft_max + 2);
    }
    return n;
}

void rebuild_sampler_history(pmtp_session * s, seq_state & sq) {
    llama_sampler_reset(sq.sampler.get());
    const int32_t last_n = sq.sampling.penalty_last_n < 0 ? (int32_t) s->n_ctx : sq.sampling.penalty_last_n;
    const size_t from = sq.history.size() > (size_t) last_n ? sq.history.size() - (size_t) last_n : 0;
    for (size_t i = from; i < sq.history.size(); ++i) {
        llama_sampler_accept(sq.sampler.get(), sq.history[i]);
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

    const bool multi = p.n_seq_max > 1;
    llama_context_params cp = llama_context_default_params();
    // n_ctx is per sequence; llama.cpp splits its n_ctx over the streams
    const uint32_t n_ctx_seq = p.n_ctx != 0 ? p.n_ctx : (uint32_t) std::max(llama_model_n_ctx_train(model->model.get()), 1);
    cp.n_ctx           = multi ? n_ctx_seq * p.n_seq_max : p.n_ctx;
    cp.n_ubatch        = ubatch_for(p, s->recurrent);
    cp.n_batch         = std::max(p.n_batch, cp.n_ubatch);
    cp.n_seq_max       = p.n_seq_max;
    cp.n_threads       = p.n_threads;
    cp.n_threads_batch = p.n_threads_batch;
    cp.flash_attn_type = multi ? LLAMA_FLASH_ATTN_TYPE_ENABLED : (llama_flash_attn_type) p.flash_attn;
    cp.no_perf         = true;
    cp.kv_unified      = !multi;  // one KV stream per sequence (see the top of this file)
    cp.swa_full        = false;
    // Recurrent state can only be rolled back over as many tokens as it has snapshots.
    cp.n_rs_seq        = (uint32_t) p.draft_max;
    if (p.type_k >= 0) cp.type_k = (ggml_type) p.type_k;
    if (p.type_v >= 0) cp.type_v = (ggml_type) p.type_v;
    if (p.type_v >= 0 && ggml_is_quantized((ggml_type) p.type_v) && p.flash_attn == 0) {
        fail(PMTP_ERR_INVALID_ARG, "a quantized V cache needs flash attention (flash_attn=-1 or 1)");
    }

    rpc_check(model);
    {
        asserts_throw checked;
        s->ctx.reset(llama_init_from_model(model->model.get(), cp));
    }
    if (!s->ctx) {
        const std::string why = last_llama_error();
        if (why.find("llama.cpp check failed") != std::string::npos) {   // an assert turned into an error
            fail(PMTP_ERR_MODEL_LOAD, "the model cannot run (" + why + "); the file is damaged or was written "
                                      "wrongly: re-download or re-convert the model");
        }
        // llama.cpp refuses some KV cache types for some models (a quantized type whose block
        // does not divide the head size, K and V types that must match): a bad argument, not memory
        for (const char * refusal : {"cache type", "requires flash_attn"}) {
            if (why.find(refusal) != std::string::npos) {
                fail(PMTP_ERR_INVALID_ARG, "this model cannot use these KV cache settings: " + why +
                     "; choose another type_k / type_v (f16, bf16 and f32 fit every model)");
            }
        }
        fail(PMTP_ERR_OUT_OF_MEMORY, "could not create a context with n_ctx=" + std::to_string(p.n_ctx) +
             " (see the log); try a smaller n_ctx or a smaller KV cache type");
    }
    s->n_ctx     = llama_n_ctx_seq(s->ctx.get());
    s->n_batch   = llama_n_batch(s->ctx.get());
    s->n_ubatch  = llama_n_ubatch(s->ctx.get());
    s->n_seq_max = p.n_seq_max;
    s->batch.reset(llama_batch_ext_init(s->ctx.get()));
    s->seqs.resize(p.n_seq_max);
    for (uint32_t i = 0; i < p.n_seq_max; ++i) {
        s->seqs[i].id = (int32_t) i;
        s->seqs[i].last_h.assign((size_t) s->n_embd, 0.0f);
        session_set_sampling(s, s->seqs[i], pmtp_sampling_default());
    }

    if (p.draft_max > 0) {
        llama_set_embeddings_nextn(s->ctx.get(), true, /*masked=*/ false);
        const pmtp_model * mtp_model = p.mtp_model ? p.mtp_model : model;
        mtp_heads_create(s, mtp_model, p.draft_max);
    }
}

void session_set_sampling(pmtp_session * s, seq_state & sq, const pmtp_sampling & sp) {
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
    if (sp.n_logprobs < -1 || sp.n_logprobs > PMTP_MAX_TOP_LOGPROBS) {
        fail(PMTP_ERR_INVALID_ARG, "n_logprobs must be in [-1, " + std::to_string(PMTP_MAX_TOP_LOGPROBS) +
                                   "] (-1 = off)");
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
    sq.sampler  = std::move(chain);
    sq.sampling = sp;
    seed_rng(sq.rng, sp.seed == 0xFFFFFFFF ? std::random_device{}() : sp.seed);
    rebuild_sampler_history(s, sq);
}

void target_decode_rows(pmtp_session * s, const target_rows & rows, bool all_logits) {
    llama_batch_ext * b = s->batch.get();
    llama_batch_ext_clear(b);
    size_t t = 0;
    for (size_t r = 0; r < rows.seqs.size(); ++r) {
        const seq_state & sq = *rows.seqs[r];
        const int32_t n = rows.n[r];
        if ((size_t) sq.n_past() + (size_t) n > s->n_ctx) {
            fail(PMTP_ERR_CONTEXT_FULL, "context is full: " + std::to_string(sq.n_past()) + " + " + std::to_string(n) +
                 " tokens > n_ctx " + std::to_string(s->n_ctx) + "; create the model with a larger n_ctx");
        }
        for (int32_t i = 0; i < n; ++i, ++t) {
            const llama_token tok = rows.tokens[t];
            if (tok < 0 || tok >= s->n_vocab) {
                fail(PMTP_ERR_INVALID_ARG, "token id " + std::to_string(tok) + " is out of range [0, " +
                     std::to_string(s->n_vocab) + ")");
            }
            const int32_t idx = llama_batch_ext_add_token(b, sq.id, tok);
            const llama_pos pos = sq.n_past() + (llama_pos) i;
            llama_batch_ext_set_pos(b, idx, &pos);
            if (all_logits || i + 1 == n) {
                llama_batch_ext_set_output_logits(b, idx, true);
            }
        }
    }
    const int32_t reused = llama_perf_context(s->ctx.get()).n_reused;
    const int32_t rc = llama_process(s->ctx.get(), LLAMA_PROCESS_TYPE_DECODE, b);
    s->n_decodes++;
    s->stats.n_target_decodes++;
    if (llama_perf_context(s->ctx.get()).n_reused == reused) {
        s->graph_builds++;   // not the last decode's graph again: a change of rows or of KV span
    }
    if (rc != 0) {
        // Fatal errors can leave processed ubatches behind: drop them so n_past stays true.
        for (seq_state * sq : rows.seqs) {
            llama_memory_seq_rm(s->mem(), sq->id, sq->n_past(), -1);
            sq->logits_row = -1;
        }
        if (rc == 1) {
            fail(PMTP_ERR_CONTEXT_FULL, "no room in the KV cache for " + std::to_string(rows.tokens.size()) +
                 " tokens; use a larger n_ctx");
        }
        if (rc == 2) {
            fail(PMTP_ERR_ABORTED, "decode aborted");
        }
        fail(PMTP_ERR_DECODE, "llama_decode failed with status " + std::to_string(rc));
    }
    rpc_check_decode(s->model, s->ctx.get());
    for (size_t r = 0; r < rows.seqs.size(); ++r) {
        rows.seqs[r]->logits_row    = rows.row0[r] + rows.n[r] - 1;
        rows.seqs[r]->logits_decode = s->n_decodes;
        rows.seqs[r]->n_last_decode = rows.n[r];
    }
}

void target_decode(pmtp_session * s, seq_state & sq, const llama_token * tokens, size_t n, llama_pos pos0, bool all_logits) {
    if (pos0 != sq.n_past()) {
        fail(PMTP_ERR_INTERNAL, "target decode at " + std::to_string(pos0) + " after " + std::to_string(sq.n_past()));
    }
    target_rows rows;
    rows.seqs   = {&sq};
    rows.tokens.assign(tokens, tokens + n);
    rows.n      = {(int32_t) n};
    rows.row0   = {0};
    target_decode_rows(s, rows, all_logits);
}

void check_swa_window(pmtp_session * s, const seq_state & sq) {
    if (s->n_swa <= 0 || !s->params.swa_guard) {
        return;
    }
    // The next decode writes position `next` and attends to [next + 1 - n_swa, next]. The
    // cache's own positions cannot stand in for `next`: after a rollback behind what the
    // ring still holds, no cell of the sequence is left, and the window is gone all the same.
    const llama_pos next = sq.n_past() - sq.n_deferred;
    if (next == 0) {
        return;
    }
    const llama_pos pos_max = llama_memory_seq_pos_max(s->mem(), sq.id);
    const llama_pos pos_min = llama_memory_seq_pos_min(s->mem(), sq.id);
    const llama_pos need = std::max<llama_pos>(0, next + 1 - s->n_swa);
    if (pos_max < next - 1 || pos_min > need) {
        const std::string held = pos_max < 0 ? "none of them"
                                             : "[" + std::to_string(pos_min) + ", " + std::to_string(pos_max) + "]";
        fail(PMTP_ERR_SWA_GUARD, "sliding-window cache lost positions that the next token attends to: it needs [" +
             std::to_string(need) + ", " + std::to_string(next - 1) + "] and holds " + held + " (window " +
             std::to_string(s->n_swa) + ")");
    }
}

void recover_target(pmtp_session * s, seq_state & sq) {
    const std::vector<llama_token> hist = sq.history;
    llama_memory_seq_rm(s->mem(), sq.id, -1, -1);
    sq.history.clear();
    for (size_t off = 0; off < hist.size(); off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, hist.size() - off);
        target_decode(s, sq, hist.data() + off, m, (llama_pos) off, false);
        sq.history.insert(sq.history.end(), hist.begin() + off, hist.begin() + off + m);
    }
    s->stats.swa_recoveries++;
    check_swa_window(s, sq);
}

void session_reset(pmtp_session * s, seq_state & sq) {
    if (s->n_seq_max == 1) {
        llama_memory_clear(s->mem(), true);
    } else {
        llama_memory_seq_rm(s->mem(), sq.id, -1, -1);
    }
    sq.n_last_decode = 0;
    sq.n_deferred = 0;
    sq.h_missing  = false;
    sq.history.clear();
    sq.pending    = -1;
    sq.logits_row = -1;
    sq.last_h.assign((size_t) s->n_embd, 0.0f);
    if (s->heads) {
        mtp_reset(s, sq);
    }
    rebuild_sampler_history(s, sq);
}

namespace {

// Decode tokens at n_past, after the tokens a rollback deferred (in the same decode as the
// first rows: a few rows more in a batch cost less than a decode of their own), in chunks
// of n_batch; queue their rows for the heads. The deferred tokens' first row is queued
// already, and the sampler has seen them.
void decode_after_deferred(pmtp_session * s, seq_state & sq, const llama_token * tokens, size_t n) {
    const size_t n_redo = (size_t) sq.n_deferred;
    std::vector<llama_token> joined;
    if (n_redo > 0) {
        joined.assign(sq.history.end() - (ptrdiff_t) n_redo, sq.history.end());
        joined.insert(joined.end(), tokens, tokens + n);
        tokens = joined.data();
        n = joined.size();
        sq.history.resize(sq.history.size() - n_redo);
        sq.n_deferred = 0;
    }
    const double t0 = now_s();
    for (size_t off = 0; off < n; off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, n - off);
        const llama_pos pos0 = sq.n_past();
        try {
            target_decode(s, sq, tokens + off, m, pos0, false);
        } catch (...) {
            if (off == 0 && n_redo > 0) {   // the deferred tokens stay deferred
                sq.history.insert(sq.history.end(), tokens, tokens + n_redo);
                sq.n_deferred = (int32_t) n_redo;
            }
            throw;
        }
        sq.history.insert(sq.history.end(), tokens + off, tokens + off + m);
        if (s->heads) {
            const float * h = llama_get_embeddings_nextn(s->ctx.get());  // [m, n_embd]
            if (off == 0 && n_redo > 0) {
                if (m > 1) {   // row pos0 + i pairs tokens[i] with h[i - 1]
                    mtp_push_rows(s, sq, tokens + 1, h, h + s->n_embd, m - 1, pos0 + 1);
                }
            } else {
                mtp_push_rows(s, sq, tokens + off, sq.last_h.data(), h, m, pos0);
            }
            std::memcpy(sq.last_h.data(), h + (m - 1) * (size_t) s->n_embd, sizeof(float) * (size_t) s->n_embd);
            sq.h_missing = false;
        }
        for (size_t i = std::max(off, n_redo); i < off + m; ++i) {
            llama_sampler_accept(sq.sampler.get(), tokens[i]);
        }
    }
    s->stats.t_prefill_s += now_s() - t0;
}

}  // namespace

void session_prefill(pmtp_session * s, seq_state & sq, const llama_token * tokens, size_t n) {
    if (n == 0) {
        return;
    }
    if ((size_t) sq.n_past() + n > s->n_ctx) {
        fail(PMTP_ERR_CONTEXT_FULL, "prompt of " + std::to_string(n) + " tokens does not fit: " +
             std::to_string(sq.n_past()) + " already in a context of " + std::to_string(s->n_ctx) +
             "; shorten the prompt or create the model with a larger n_ctx");
    }
    if (sq.pending >= 0 && s->heads) {
        mtp_rollback(s, sq, sq.n_past(), sq.n_past(), false);  // forget the pending token's row
    }
    sq.pending = -1;
    decode_after_deferred(s, sq, tokens, n);
}

void session_settle(pmtp_session * s, seq_state & sq) {
    if (sq.n_deferred > 0) {
        decode_after_deferred(s, sq, nullptr, 0);
    }
}

llama_token session_sample(pmtp_session * s, seq_state & sq, pmtp_step_result * out, int32_t i) {
    if (sq.h_missing && sq.logits_row < 0 && sq.pending < 0 && sq.n_deferred == 0 && sq.n_past() > 0) {
        // a rollback that decoded nothing again (mtp_rollback_gap), then no prefill: the
        // last kept token is decoded again now, for its logits
        if (!llama_memory_seq_rm(s->mem(), sq.id, sq.n_past() - 1, -1)) {
            fail(PMTP_ERR_INTERNAL, "cannot drop the last kept token to decode it again");
        }
        sq.n_deferred = 1;
    }
    session_settle(s, sq);
    if (sq.logits_row < 0) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to sample from: prefill a prompt first");
    }
    if (sq.logits_decode != s->n_decodes) {
        fail(PMTP_ERR_INVALID_ARG, "sequence " + std::to_string(sq.id) + "'s logits were overwritten by a later "
             "decode of another sequence; sample right after its prefill");
    }
    if (sq.pending >= 0) {
        fail(PMTP_ERR_INVALID_ARG, "a sampled token is already pending; call step to decode it");
    }
    const double t0 = now_s();
    const llama_token t = llama_sampler_sample(sq.sampler.get(), s->ctx.get(), sq.logits_row);
    s->stats.t_sample_s += now_s() - t0;
    sq.pending = t;
    out->tokens[i]     = t;
    out->from_draft[i] = false;
    out->n_tokens      = i + 1;
    fill_logprobs(sq.sampling, llama_get_logits_ith(s->ctx.get(), sq.logits_row), s->n_vocab, i, out);
    if (s->heads) {
        // Queue the pending token's row for the heads: it pairs with h[n_past - 1].
        mtp_push_rows(s, sq, &t, sq.last_h.data(), nullptr, 1, sq.n_past());
    }
    return t;
}

namespace {

// How far back the recurrent state can go. The target keeps n_rs_seq + 1 = draft_max + 1
// snapshot slots, slot r holding the state r tokens before the end of the last ubatch, but
// only the last min(n_tokens, n_rs_seq + 1) of that ubatch's tokens are written (ggml's
// gated_delta_net / ssm conv: older slots keep whatever an earlier ubatch left there), so
// r must stay below the ubatch's token count. Upstream's seq_rm only checks r <= n_rs_seq
// and would restore a stale slot (e.g. two tokens back after a single-token decode).
int32_t rs_rollback_max(const pmtp_session * s, const seq_state & sq) {
    const int32_t slots = s->params.draft_max + 1;
    // a decode longer than a ubatch keeps its trailing n_rs_seq + 1 tokens in its last ubatch
    // (split_equal's keep-tail) when a ubatch can hold them; assume nothing otherwise
    const int32_t n_ub = (int32_t) s->n_ubatch;
    const int32_t last_ubatch = sq.n_last_decode <= n_ub ? sq.n_last_decode : (n_ub >= slots ? slots : 1);
    return std::max(0, std::min(last_ubatch, slots) - 1);
}

}  // namespace

void session_rollback(pmtp_session * s, seq_state & sq, int32_t n_keep) {
    if (n_keep < 0 || n_keep > sq.n_past()) {
        fail(PMTP_ERR_INVALID_ARG, "rollback to " + std::to_string(n_keep) + " outside [0, " + std::to_string(sq.n_past()) + "]");
    }
    if (n_keep == 0) {
        session_reset(s, sq);
        return;
    }
    if (n_keep == sq.n_past()) {
        if (sq.pending >= 0 && s->heads) {
            mtp_rollback(s, sq, n_keep, n_keep, false);
        }
        sq.pending = -1;
        return;
    }
    // With MTP the heads need the target's hidden states of the last tokens kept (h[n_keep - 1]
    // for the next row, and for chained heads the rows each head re-runs to feed the next),
    // which only a decode gives back: drop that many more tokens from the target, to be
    // decoded again with the next prefill (or by session_settle).
    session_settle(s, sq);        // (a rollback right after a rollback: the rows it deferred first)
    const int32_t n_redo   = s->heads ? std::min(n_keep, mtp_rollback_redo(s, sq)) : 0;
    const int32_t n_target = n_keep - n_redo;
    const bool snapshots_ok = !s->recurrent || sq.n_past() - n_target <= rs_rollback_max(s, sq);
    if (!snapshots_ok || !llama_memory_seq_rm(s->mem(), sq.id, n_target, -1)) {
        fail(PMTP_ERR_INVALID_ARG, "this model's state cannot be rolled back to " + std::to_string(n_keep) +
             " tokens (recurrent state); reset and prefill again");
    }
    sq.history.resize((size_t) n_keep);
    sq.n_deferred = n_redo;
    sq.pending    = -1;
    sq.logits_row = -1;
    if (s->heads && n_redo == 0) {
        mtp_rollback_gap(s, sq, n_keep);
        sq.h_missing = true;
    } else if (s->heads) {
        mtp_rollback(s, sq, n_keep, n_target + 1, true);
        sq.h_missing = false;
        if (n_target == 0) {
            sq.last_h.assign((size_t) s->n_embd, 0.0f);
        }
    }
    check_swa_window(s, sq);
    if (s->recurrent) {
        // a recurrent state rolls back by snapshots of the last decode: decode now, so
        // that what a later rollback can reach stays what it was
        session_settle(s, sq);
    }
    rebuild_sampler_history(s, sq);
}

void guard_window(pmtp_session * s, seq_state & sq) {
    if (!s->params.swa_guard || s->n_swa <= 0) {
        return;
    }
    try {
        check_swa_window(s, sq);
    } catch (const pmtp_error &) {
        recover_target(s, sq);
    }
}
