// The MTP state machine: heads, draft, verify, accept, rollback, catch-up.
//
// A head's row p pairs token[p] with the target's hidden state h[p - 1] ("clean"
// rows, the inputs upstream's catch-up uses). Row 0 has no hidden state before it:
// upstream pairs it with zeros, a row no MTP block was trained on (training, and
// StepFun's and transformers' drivers, start at token[1] with h[0]), and every later
// row attends to it. So row 0 never enters a head, and row p sits at the head's KV
// position p - 1 (RoPE is relative: the shift changes nothing else). The target hands
// every such row to a queue as soon as it knows it (prefill, plain decode, the
// accepted part of a verify, the newly sampled token); the heads take the queued
// rows only when they next draft, in the same decode as their draft rows, so a
// cycle costs one decode per head and plain decoding with MTP enabled costs the
// heads nothing (the queue is flushed in large batches if it grows).
//
// State between calls (P = n_past, t = the pending token at position P): target
// KV holds [0, P); head j holds clean rows [0, n_clean[j]); the queue holds the
// rows [queue_pos0, P] that some head still lacks (row P is t's).
//
// Drafting k tokens: head j (chained heads, step35) runs its missing clean rows up
// to P plus the draft rows P+1 .. P+j, whose inputs are d_m with the previous head's
// hidden output; its last row yields d_{j+1}. The single head of qwen35 and friends
// runs its clean rows and row P once, then one row per further draft step. Draft
// rows are "dirty" and are dropped before the head next runs.
//
// Verify: the target decodes [t, d1..dk] in one batch; tokens are sampled row by
// row with the session's sampler and drafts accepted while they match. The target
// keeps P .. P+n (n accepted), the new pending token s sits at P+n+1, and only the
// rows P+1 .. P+n+1 (accepted drafts, then s) join the queue; upstream re-runs all
// k+1 verify rows on every head after every verify.
//
// Each chained head has its own context, so its KV is never disturbed by another
// head's rows; upstream shares one context and relies on cells being reused in
// the same order after each removal.
#include "internal.h"

#include "llama-ext.h"

#include <algorithm>
#include <cstring>

struct mtp_head {
    context_ptr ctx;
    batch_ptr   batch;
    int32_t     n_kv = 0;  // rows [0, n_kv) are in this head's KV (row p at position p - 1)
};

struct mtp_heads {
    const pmtp_model *    model = nullptr;   // the model holding the MTP blocks
    std::vector<mtp_head> heads;
    std::vector<int32_t>  n_clean;           // per head: clean rows [0, n_clean)
    bool                  chained = false;   // one trained head per draft step
    int32_t               n_embd  = 0;
    int32_t               n_vocab = 0;

    // rows some head still lacks: position queue_pos0 + i pairs queue_tok[i] with queue_h[i]
    llama_pos                queue_pos0 = 0;
    std::vector<llama_token> queue_tok;
    std::vector<float>       queue_h;        // [queue_tok.size(), n_embd]

    std::vector<llama_token> d;              // drafts of the current cycle, [k]
    std::vector<float>    g;                 // hidden outputs, g[m] feeds d[m], [k, n_embd]
    std::vector<float>    q;                 // draft distributions (rejection sampling), [k, n_vocab]
    std::vector<float>    p;                 // target distributions of a verify, [k + 1, n_vocab]

    llama_pos queue_end() const { return queue_pos0 + (llama_pos) queue_tok.size(); }
    const float * queue_row(llama_pos pos) const { return queue_h.data() + (size_t) (pos - queue_pos0) * n_embd; }
};

void mtp_heads_deleter::operator()(mtp_heads * h) const { delete h; }

namespace {

void check_compatible(const pmtp_model * trunk, const pmtp_model * mtp) {
    if (mtp == trunk) {
        return;
    }
    auto mismatch = [&](const std::string & what, const std::string & a, const std::string & b) {
        fail(PMTP_ERR_MTP, mtp->path + " does not match " + trunk->path + ": " + what + " " + b + " vs " + a +
             "; use the MTP file converted from the same checkpoint");
    };
    if (mtp->arch != trunk->arch) {
        mismatch("architecture", trunk->arch, mtp->arch);
    }
    const int32_t ea = llama_model_n_embd(trunk->model.get()), eb = llama_model_n_embd(mtp->model.get());
    if (ea != eb) {
        mismatch("n_embd", std::to_string(ea), std::to_string(eb));
    }
    if (n_vocab_of(trunk) != n_vocab_of(mtp)) {
        mismatch("vocabulary size", std::to_string(n_vocab_of(trunk)), std::to_string(n_vocab_of(mtp)));
    }
    // A trunk exported without its MTP layers (conversion/qwen.py --no-mtp) declares none;
    // one exported with them stripped (step35) declares the same count as the MTP file.
    const bool mtp_counts_differ = trunk->n_layer_mtp != 0 && trunk->n_layer_mtp != mtp->n_layer_mtp;
    if (trunk->n_layer != mtp->n_layer || mtp_counts_differ) {
        mismatch("layer counts (trunk+MTP)", std::to_string(trunk->n_layer) + "+" + std::to_string(trunk->n_layer_mtp),
                 std::to_string(mtp->n_layer) + "+" + std::to_string(mtp->n_layer_mtp));
    }
}

mtp_head make_head(pmtp_session * s, const pmtp_model * m, int32_t offset) {
    llama_context_params cp = llama_context_default_params();
    cp.ctx_type        = LLAMA_CONTEXT_TYPE_MTP;
    cp.n_ctx           = s->n_ctx;
    cp.n_batch         = s->n_batch;
    cp.n_ubatch        = s->n_ubatch;
    cp.n_seq_max       = 1;
    cp.n_threads       = s->params.n_threads;
    cp.n_threads_batch = s->params.n_threads_batch;
    cp.flash_attn_type = (llama_flash_attn_type) s->params.flash_attn;
    cp.no_perf         = true;
    cp.kv_unified      = true;
    if (s->params.type_k >= 0) cp.type_k = (ggml_type) s->params.type_k;
    if (s->params.type_v >= 0) cp.type_v = (ggml_type) s->params.type_v;

    mtp_head head;
    head.ctx.reset(llama_init_from_model(m->model.get(), cp));
    if (!head.ctx) {
        fail(PMTP_ERR_MTP, "could not create the MTP context for " + m->path + " (see the log)");
    }
    llama_set_embeddings_nextn(head.ctx.get(), true, /*masked=*/ true);
    llama_set_nextn_layer_offset(head.ctx.get(), offset);
    head.batch.reset(llama_batch_ext_init(head.ctx.get()));
    return head;
}

llama_token argmax(const float * logits, int32_t n) {
    return (llama_token) (std::max_element(logits, logits + n) - logits);
}

// Row p lives at KV position p - 1 (row 0 is never stored); n_kv counts rows.
llama_pos kv_pos(llama_pos row) { return row - 1; }

void head_truncate(mtp_head & h, int32_t n_keep) {
    if (h.n_kv > n_keep) {
        llama_memory_seq_rm(llama_get_memory(h.ctx.get()), 0, std::max<llama_pos>(0, kv_pos(n_keep)), -1);
        h.n_kv = n_keep;
    }
}

// Run rows pos0 .. pos0+n-1 on one head (row 0 skipped); row i pairs tokens[i] with
// h_in(i). Only the last row produces output (logits and hidden state).
template <typename HRow>
void head_decode(pmtp_session * s, mtp_head & h, const llama_token * tokens, size_t n, llama_pos pos0, HRow h_in) {
    const int32_t n_embd = s->heads->n_embd;
    for (size_t off = 0; off < n; off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, n - off);
        llama_batch_ext * b = h.batch.get();
        llama_batch_ext_clear(b);
        int32_t n_rows = 0;
        for (size_t i = off; i < off + m; ++i) {
            const llama_pos row = pos0 + (llama_pos) i;
            if (row == 0) {
                continue;
            }
            const int32_t idx = llama_batch_ext_add_token(b, 0, tokens[i]);
            const llama_pos pos = kv_pos(row);
            llama_batch_ext_set_pos(b, idx, &pos);
            llama_batch_ext_set_embd_token(b, idx, {h_in(i), 1, (size_t) n_embd});
            if (i + 1 == off + m) {
                llama_batch_ext_set_output_logits(b, idx, true);
            }
            n_rows++;
        }
        const int32_t rc = n_rows > 0 ? llama_process(h.ctx.get(), LLAMA_PROCESS_TYPE_DECODE, b) : 0;
        if (rc != 0) {
            llama_memory_seq_rm(llama_get_memory(h.ctx.get()), 0, std::max<llama_pos>(0, kv_pos(pos0 + (llama_pos) off)), -1);
            h.n_kv = pos0 + (int32_t) off;
            fail(rc == 1 ? PMTP_ERR_CONTEXT_FULL : PMTP_ERR_DECODE,
                 "MTP head decode failed with status " + std::to_string(rc));
        }
        rpc_check_decode(s->heads->model, h.ctx.get());
        h.n_kv = pos0 + (int32_t) (off + m);
    }
}

// Output of the last row of the last head_decode: its hidden state goes to g_out, and
// the draft token is the head's greedy choice, or (rejection sampling) a draw from the
// head's distribution q after the session's sampler transforms, kept in q_out.
llama_token head_output(pmtp_session * s, mtp_head & h, float * g_out, float * q_out) {
    const float * logits = llama_get_logits_ith(h.ctx.get(), -1);
    const float * hid    = llama_get_embeddings_nextn_ith(h.ctx.get(), -1);
    if (!logits || !hid) {
        fail(PMTP_ERR_INTERNAL, "MTP head produced no output");
    }
    std::memcpy(g_out, hid, sizeof(float) * (size_t) s->heads->n_embd);
    if (q_out) {
        sampling_probs(s->sampling, logits, s->heads->n_vocab, q_out);
        return sample_dense(q_out, s->heads->n_vocab, s->rng);
    }
    return argmax(logits, s->heads->n_vocab);
}

}  // namespace

void mtp_heads_create(pmtp_session * s, const pmtp_model * m, int32_t draft_max) {
    if (m->n_layer_mtp <= 0) {
        fail(PMTP_ERR_MTP, m->path + ": model has no MTP layers; use mtp=False");
    }
    if (!m->mtp_loaded) {
        fail(PMTP_ERR_MTP, m->path + " was loaded without its MTP layers; load it with load_mtp=true");
    }
    check_compatible(s->model, m);
    if (s->model != m && !s->model->has_trunk) {
        fail(PMTP_ERR_MTP, s->model->path + " has no trunk tensors");
    }
    heads_ptr h(new mtp_heads());
    h->model   = m;
    h->n_embd  = llama_model_n_embd_out(m->model.get());
    h->n_vocab = n_vocab_of(m);
    h->chained = m->n_layer_mtp > 1;
    if (h->chained && draft_max > m->n_layer_mtp) {
        fail(PMTP_ERR_INVALID_ARG, m->arch + " has " + std::to_string(m->n_layer_mtp) +
             " chained MTP heads, one per draft step: draft must be <= " + std::to_string(m->n_layer_mtp));
    }
    if (h->n_embd != s->n_embd) {
        fail(PMTP_ERR_MTP, "MTP input width " + std::to_string(h->n_embd) + " != target hidden width " + std::to_string(s->n_embd));
    }
    s->heads = std::move(h);  // head_decode reaches the widths through the session
    const int32_t n_heads = s->heads->chained ? draft_max : 1;
    for (int32_t i = 0; i < n_heads; ++i) {
        s->heads->heads.push_back(make_head(s, m, i));
    }
    s->heads->n_clean.assign(s->heads->heads.size(), 0);
    s->heads->d.assign((size_t) draft_max + 1, 0);
    s->heads->g.assign((size_t) (draft_max + 1) * s->heads->n_embd, 0.0f);
    s->heads->q.assign((size_t) (draft_max + 1) * s->heads->n_vocab, 0.0f);
    s->heads->p.assign((size_t) (draft_max + 1) * s->heads->n_vocab, 0.0f);
    s->last_h.assign((size_t) s->n_embd, 0.0f);
}

namespace {

// Drop queued rows that every head has taken; the newest row stays so that a head
// can always run it again (a second pmtp_draft from the same pending token).
void queue_trim(mtp_heads & H) {
    const llama_pos base = std::min(*std::min_element(H.n_clean.begin(), H.n_clean.end()), H.queue_end() - 1);
    if (base > H.queue_pos0) {
        const size_t n = (size_t) (base - H.queue_pos0);
        H.queue_tok.erase(H.queue_tok.begin(), H.queue_tok.begin() + n);
        H.queue_h.erase(H.queue_h.begin(), H.queue_h.begin() + n * H.n_embd);
        H.queue_pos0 = base;
    }
}

// Run head j over its missing clean rows [n_clean, end) and then `extra` draft rows
// P+1 .. P+extra (tokens d[0..extra), hidden inputs g[0..extra)); end is P+1 when drafting.
void head_run(pmtp_session * s, size_t j, llama_pos end, int32_t extra) {
    mtp_heads & H = *s->heads;
    mtp_head & h = H.heads[j];
    const llama_pos from = H.n_clean[j];
    head_truncate(h, from);
    const size_t n_clean_rows = (size_t) (end - from);
    std::vector<llama_token> tokens(H.queue_tok.begin() + (from - H.queue_pos0), H.queue_tok.begin() + (end - H.queue_pos0));
    tokens.insert(tokens.end(), H.d.begin(), H.d.begin() + extra);
    head_decode(s, h, tokens.data(), tokens.size(), from, [&](size_t i) {
        return i < n_clean_rows ? H.queue_row(from + (llama_pos) i) : H.g.data() + (i - n_clean_rows) * H.n_embd;
    });
    H.n_clean[j] = end;
}

}  // namespace

void mtp_reset(pmtp_session * s) {
    mtp_heads & H = *s->heads;
    for (auto & h : H.heads) {
        llama_memory_clear(llama_get_memory(h.ctx.get()), true);
        h.n_kv = 0;
    }
    std::fill(H.n_clean.begin(), H.n_clean.end(), 0);
    H.queue_pos0 = 0;
    H.queue_tok.clear();
    H.queue_h.clear();
}

void mtp_rollback(pmtp_session * s, int32_t n_keep) {
    mtp_heads & H = *s->heads;
    for (size_t j = 0; j < H.heads.size(); ++j) {
        H.n_clean[j] = std::min(H.n_clean[j], n_keep);
        head_truncate(H.heads[j], n_keep);
    }
    if (H.queue_end() > n_keep) {
        const size_t keep = (size_t) std::max<llama_pos>(0, n_keep - H.queue_pos0);
        H.queue_tok.resize(keep);
        H.queue_h.resize(keep * H.n_embd);
        H.queue_pos0 = std::min(H.queue_pos0, n_keep);
    }
}

void mtp_flush(pmtp_session * s) {
    mtp_heads & H = *s->heads;
    const double t0 = now_s();
    for (size_t j = 0; j < H.heads.size(); ++j) {
        if (H.n_clean[j] < H.queue_end()) {
            head_run(s, j, H.queue_end(), 0);
        }
    }
    queue_trim(H);
    s->stats.t_catchup_s += now_s() - t0;
}

void mtp_push_rows(pmtp_session * s, const llama_token * tokens, const float * h_prev_first,
                   const float * h_rows, size_t n, llama_pos pos0) {
    mtp_heads & H = *s->heads;
    if (pos0 != H.queue_end()) {
        fail(PMTP_ERR_INTERNAL, "MTP queue out of step: row " + std::to_string(pos0) + " after " +
             std::to_string(H.queue_end()));
    }
    const size_t n_embd = (size_t) H.n_embd;
    for (size_t i = 0; i < n; ++i) {
        const float * h = i == 0 ? h_prev_first : h_rows + (i - 1) * n_embd;
        H.queue_tok.push_back(tokens[i]);
        H.queue_h.insert(H.queue_h.end(), h, h + n_embd);
    }
    // Long stretches without drafting (prefill, draft=0) are taken in large batches.
    if (H.queue_tok.size() > s->n_batch) {
        mtp_flush(s);
    }
}

size_t mtp_draft(pmtp_session * s, int32_t k, llama_token * out) {
    mtp_heads & H = *s->heads;
    const llama_pos P = s->n_past();
    if (s->pending < 0 || H.queue_end() != P + 1) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to draft from: sample a token first");
    }
    const double t0 = now_s();
    const size_t n_embd = (size_t) H.n_embd;
    for (auto & n : H.n_clean) {
        n = std::min(n, P);  // row P always runs: its output is d1
    }
    for (int32_t j = 0; j < k; ++j) {
        size_t head = H.chained ? (size_t) j : 0;
        if (H.chained || j == 0) {
            head_run(s, head, P + 1, j);      // clean rows .. P, then drafts P+1 .. P+j
        } else {
            mtp_head & h = H.heads[0];         // one more row on the single head
            head_decode(s, h, &H.d[(size_t) j - 1], 1, P + j,
                        [&](size_t) { return H.g.data() + (size_t) (j - 1) * n_embd; });
        }
        float * q = rejection_mode(s) ? H.q.data() + (size_t) j * H.n_vocab : nullptr;
        H.d[(size_t) j] = head_output(s, H.heads[head], H.g.data() + (size_t) j * n_embd, q);
    }
    queue_trim(H);
    std::copy(H.d.begin(), H.d.begin() + k, out);
    s->stats.t_draft_s += now_s() - t0;
    return (size_t) k;
}

const float * mtp_head_logits(const pmtp_session * s, int32_t head) {
    const mtp_heads & H = *s->heads;
    if (head < 0 || (size_t) head >= H.heads.size()) {
        fail(PMTP_ERR_INVALID_ARG, "head " + std::to_string(head) + " out of range [0, " +
             std::to_string(H.heads.size()) + ")");
    }
    const mtp_head & h = H.heads[(size_t) head];
    const float * logits = h.n_kv > 0 ? llama_get_logits_ith(h.ctx.get(), -1) : nullptr;
    if (!logits) {
        fail(PMTP_ERR_INVALID_ARG, "MTP head " + std::to_string(head) + " has no output yet: call pmtp_draft first");
    }
    return logits;
}

namespace {

// Re-decode the whole history after the sliding-window guard found lost cells.
void recover_target(pmtp_session * s) {
    const std::vector<llama_token> hist = s->history;
    llama_memory_clear(s->mem(), true);
    s->history.clear();
    for (size_t off = 0; off < hist.size(); off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, hist.size() - off);
        target_decode(s, hist.data() + off, m, (llama_pos) off, false);
        s->history.insert(s->history.end(), hist.begin() + off, hist.begin() + off + m);
    }
    s->stats.swa_recoveries++;
    check_swa_window(s);
}

}  // namespace

bool rejection_mode(const pmtp_session * s) {
    return s->sampling.accept == 1 && s->sampling.temperature > 0.0f;
}

namespace {

// Match rule: sample each row with the session's sampler; accept while it equals the draft.
size_t accept_matching(pmtp_session * s, const llama_token * drafts, size_t n, llama_token & next) {
    for (size_t j = 0; j <= n; ++j) {
        const llama_token tok = llama_sampler_sample(s->sampler.get(), s->ctx.get(), (int32_t) j);
        if (j < n && tok == drafts[j]) {
            continue;
        }
        next = tok;
        return j;
    }
    return n;  // unreachable: row n always breaks
}

// Rejection sampling against the draft distributions q; emitted tokens still go into the
// sampler's history so that a later plain step sees the same context.
size_t accept_rejection(pmtp_session * s, const llama_token * drafts, size_t n, const float * q, llama_token & next) {
    mtp_heads & H = *s->heads;
    for (size_t j = 0; j <= n; ++j) {
        sampling_probs(s->sampling, llama_get_logits_ith(s->ctx.get(), (int32_t) j), H.n_vocab,
                       H.p.data() + j * (size_t) H.n_vocab);
    }
    const size_t n_acc = rejection_verify(H.p.data(), q, drafts, n, H.n_vocab, s->rng, next);
    for (size_t j = 0; j < n_acc; ++j) {
        llama_sampler_accept(s->sampler.get(), drafts[j]);
    }
    llama_sampler_accept(s->sampler.get(), next);
    return n_acc;
}

}  // namespace

void mtp_step(pmtp_session * s, int32_t k, pmtp_step_result * out) {
    llama_token drafts[8];
    const size_t n = mtp_draft(s, k, drafts);
    mtp_verify(s, drafts, n, rejection_mode(s) ? s->heads->q.data() : nullptr, out);
}

void mtp_verify(pmtp_session * s, const llama_token * drafts, size_t n, const float * q, pmtp_step_result * out) {
    mtp_heads & H = *s->heads;
    if (s->pending < 0) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to verify: sample a token first");
    }
    const llama_pos P = s->n_past();
    if ((size_t) P + 1 > s->n_ctx) {
        fail(PMTP_ERR_CONTEXT_FULL, "context is full (n_ctx " + std::to_string(s->n_ctx) + ")");
    }
    n = std::min<size_t>(n, std::min<size_t>((size_t) s->params.draft_max, s->n_ctx - (size_t) P - 1));

    double t0 = now_s();
    std::vector<llama_token> rows(n + 1);  // [pending, d1..dn]
    rows[0] = s->pending;
    std::copy(drafts, drafts + n, rows.begin() + 1);
    target_decode(s, rows.data(), n + 1, P, true);
    s->history.push_back(s->pending);
    s->pending = -1;

    llama_token next = -1;
    const size_t n_acc = q ? accept_rejection(s, rows.data() + 1, n, q, next)
                           : accept_matching(s, rows.data() + 1, n, next);
    for (size_t j = 0; j < n_acc; ++j) {
        out->tokens[j]     = rows[j + 1];
        out->from_draft[j] = true;
    }
    out->tokens[n_acc]     = next;
    out->from_draft[n_acc] = false;
    out->n_tokens   = (int32_t) n_acc + 1;
    out->n_drafted  = (int32_t) n;
    out->n_accepted = (int32_t) n_acc;
    for (size_t j = 0; j <= n_acc; ++j) {  // token j was sampled from verify row j
        fill_logprobs(s->sampling, llama_get_logits_ith(s->ctx.get(), (int32_t) j), s->n_vocab, (int32_t) j, out);
    }

    // Keep [0, P + n_acc]: the pending token and the accepted drafts.
    llama_memory_seq_rm(s->mem(), 0, P + 1 + (llama_pos) n_acc, -1);
    s->history.insert(s->history.end(), rows.begin() + 1, rows.begin() + 1 + n_acc);
    s->pending = next;
    s->stats.t_verify_s += now_s() - t0;

    // Heads: queue rows P+1 .. P+n_acc+1 (accepted drafts, then the new pending token).
    const float * h = llama_get_embeddings_nextn(s->ctx.get());  // [n + 1, n_embd]
    const size_t n_embd = (size_t) H.n_embd;
    std::memcpy(s->last_h.data(), h + n_acc * n_embd, sizeof(float) * n_embd);
    std::vector<llama_token> new_rows(rows.begin() + 1, rows.begin() + 1 + n_acc);
    new_rows.push_back(next);
    mtp_push_rows(s, new_rows.data(), h, h + n_embd, new_rows.size(), P + 1);

    if (s->params.swa_guard && s->n_swa > 0) {
        try {
            check_swa_window(s);
        } catch (const pmtp_error &) {
            recover_target(s);
        }
    }

    s->stats.n_steps++;
    s->stats.n_drafted  += n;
    s->stats.n_accepted += n_acc;
    s->stats.n_emitted  += n_acc + 1;
    for (size_t i = 0; i < n && i < 8; ++i) {
        s->stats.drafted_at[i]++;
        s->stats.accepted_at[i] += i < n_acc;
        if (q) {
            s->stats.drafted_at_rejection[i]++;
            s->stats.accepted_at_rejection[i] += i < n_acc;
        }
    }
}
