// The MTP state machine: heads, draft, verify, accept, rollback, catch-up.
//
// State between calls (P = n_past, t = the pending token at position P):
//   target KV holds positions [0, P); every head's KV holds [0, P], where the
//   row at position p pairs token[p] with the target's hidden state h[p - 1]
//   ("clean" rows, the same inputs upstream feeds its catch-up). Head 0 has
//   already run the row of t, so the first draft d1 and head 0's hidden output
//   g0 are cached.
//
// Drafting k tokens: d1 is cached; draft step j (1 <= j < k) runs rows
// P+1 .. P+j on head j (chained heads, step35) or only row P+j on the single
// head (qwen35 and friends), feeding d_m with the previous step's hidden output.
// Those draft rows are "dirty" and are dropped by the next catch-up.
//
// Verify: the target decodes [t, d1..dk] in one batch; tokens are sampled row by
// row with the session's sampler and drafts accepted while they match. The
// target keeps P .. P+n (n accepted), the new pending token s sits at P+n+1.
// Catch-up then runs only rows P+1 .. P+n+1 on each head (accepted drafts + s),
// where upstream re-runs all k+1 verify rows on every head.
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
    int32_t     n_kv = 0;  // positions [0, n_kv) are in this head's KV
};

struct mtp_heads {
    const pmtp_model *    model = nullptr;   // the model holding the MTP blocks
    std::vector<mtp_head> heads;
    bool                  chained = false;   // one trained head per draft step
    int32_t               n_embd  = 0;
    int32_t               n_vocab = 0;

    bool                  have_d1 = false;   // head 0 ran the pending token's row
    std::vector<llama_token> d;              // drafts of the current cycle, [k]
    std::vector<float>    g;                 // hidden outputs, g[m] feeds d[m], [k, n_embd]
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
    if (trunk->n_layer != mtp->n_layer || trunk->n_layer_mtp != mtp->n_layer_mtp) {
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

void head_truncate(mtp_head & h, int32_t n_keep) {
    if (h.n_kv > n_keep) {
        llama_memory_seq_rm(llama_get_memory(h.ctx.get()), 0, n_keep, -1);
        h.n_kv = n_keep;
    }
}

// Run rows at positions pos0 .. pos0+n-1 on one head; row i pairs tokens[i] with
// h_in(i). Only the last row produces output (logits and hidden state).
template <typename HRow>
void head_decode(pmtp_session * s, mtp_head & h, const llama_token * tokens, size_t n, llama_pos pos0, HRow h_in) {
    const int32_t n_embd = s->heads->n_embd;
    for (size_t off = 0; off < n; off += s->n_batch) {
        const size_t m = std::min<size_t>(s->n_batch, n - off);
        llama_batch_ext * b = h.batch.get();
        llama_batch_ext_clear(b);
        for (size_t i = off; i < off + m; ++i) {
            const int32_t idx = llama_batch_ext_add_token(b, 0, tokens[i]);
            const llama_pos pos = pos0 + (llama_pos) i;
            llama_batch_ext_set_pos(b, idx, &pos);
            llama_batch_ext_set_embd_token(b, idx, {h_in(i), 1, (size_t) n_embd});
            if (i + 1 == off + m) {
                llama_batch_ext_set_output_logits(b, idx, true);
            }
        }
        const int32_t rc = llama_process(h.ctx.get(), LLAMA_PROCESS_TYPE_DECODE, b);
        if (rc != 0) {
            llama_memory_seq_rm(llama_get_memory(h.ctx.get()), 0, pos0 + (llama_pos) off, -1);
            h.n_kv = pos0 + (int32_t) off;
            fail(rc == 1 ? PMTP_ERR_CONTEXT_FULL : PMTP_ERR_DECODE,
                 "MTP head decode failed with status " + std::to_string(rc));
        }
        h.n_kv = pos0 + (int32_t) (off + m);
    }
}

// Output of the last row of the last head_decode: greedy draft and hidden state.
llama_token head_output(pmtp_session * s, mtp_head & h, float * g_out) {
    const float * logits = llama_get_logits_ith(h.ctx.get(), -1);
    const float * hid    = llama_get_embeddings_nextn_ith(h.ctx.get(), -1);
    if (!logits || !hid) {
        fail(PMTP_ERR_INTERNAL, "MTP head produced no output");
    }
    std::memcpy(g_out, hid, sizeof(float) * (size_t) s->heads->n_embd);
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
    s->heads->d.assign((size_t) draft_max + 1, 0);
    s->heads->g.assign((size_t) (draft_max + 1) * s->heads->n_embd, 0.0f);
    s->last_h.assign((size_t) s->n_embd, 0.0f);
}

void mtp_reset(pmtp_session * s) {
    for (auto & h : s->heads->heads) {
        llama_memory_clear(llama_get_memory(h.ctx.get()), true);
        h.n_kv = 0;
    }
    s->heads->have_d1 = false;
}

void mtp_rollback(pmtp_session * s, int32_t n_keep) {
    for (auto & h : s->heads->heads) {
        head_truncate(h, n_keep);
    }
    s->heads->have_d1 = false;
}

void mtp_catch_up(pmtp_session * s, const llama_token * tokens, const float * h_prev_first,
                  const float * h_rows, size_t n, llama_pos pos0) {
    mtp_heads & H = *s->heads;
    const double t0 = now_s();
    const size_t n_embd = (size_t) H.n_embd;
    auto h_in = [&](size_t i) { return i == 0 ? h_prev_first : h_rows + (i - 1) * n_embd; };
    for (size_t k = 0; k < H.heads.size(); ++k) {
        head_truncate(H.heads[k], pos0);
        head_decode(s, H.heads[k], tokens, n, pos0, h_in);
    }
    // The last row is the pending token's when it sits at n_past: head 0's output there is d1.
    H.have_d1 = pos0 + (llama_pos) n == s->n_past() + 1;
    if (H.have_d1) {
        H.d[0] = head_output(s, H.heads[0], H.g.data());
    }
    s->stats.t_catchup_s += now_s() - t0;
}

size_t mtp_draft(pmtp_session * s, int32_t k, llama_token * out) {
    mtp_heads & H = *s->heads;
    if (s->pending < 0 || !H.have_d1) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to draft from: sample a token first");
    }
    const double t0 = now_s();
    const llama_pos P = s->n_past();
    const size_t n_embd = (size_t) H.n_embd;
    for (auto & h : H.heads) {
        head_truncate(h, P + 1);  // forget the dirty rows of an earlier draft
    }
    for (int32_t j = 1; j < k; ++j) {
        mtp_head & h = H.chained ? H.heads[(size_t) j] : H.heads[0];
        // rows P+m for m in [h.n_kv - P, j] carry d[m-1] with the hidden output g[m-1]
        const int32_t m0 = h.n_kv - P;
        head_decode(s, h, H.d.data() + (m0 - 1), (size_t) (j - m0 + 1), P + m0,
                    [&](size_t i) { return H.g.data() + (size_t) (m0 - 1 + (int32_t) i) * n_embd; });
        H.d[(size_t) j] = head_output(s, h, H.g.data() + (size_t) j * n_embd);
    }
    std::copy(H.d.begin(), H.d.begin() + k, out);
    s->stats.t_draft_s += now_s() - t0;
    return (size_t) k;
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

void mtp_verify(pmtp_session * s, const llama_token * drafts, size_t n, pmtp_step_result * out) {
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

    size_t n_acc = 0;
    llama_token next = -1;
    for (size_t j = 0; j <= n; ++j) {
        const llama_token tok = llama_sampler_sample(s->sampler.get(), s->ctx.get(), (int32_t) j);
        if (j < n && tok == rows[j + 1]) {
            out->tokens[n_acc] = tok;
            out->from_draft[n_acc] = true;
            n_acc++;
            continue;
        }
        next = tok;
        break;
    }
    out->tokens[n_acc]     = next;
    out->from_draft[n_acc] = false;
    out->n_tokens   = (int32_t) n_acc + 1;
    out->n_drafted  = (int32_t) n;
    out->n_accepted = (int32_t) n_acc;

    // Keep [0, P + n_acc]: the pending token and the accepted drafts.
    llama_memory_seq_rm(s->mem(), 0, P + 1 + (llama_pos) n_acc, -1);
    s->history.insert(s->history.end(), rows.begin() + 1, rows.begin() + 1 + n_acc);
    s->pending = next;
    s->stats.t_verify_s += now_s() - t0;

    // Heads: rows P+1 .. P+n_acc+1 (accepted drafts, then the new pending token).
    const float * h = llama_get_embeddings_nextn(s->ctx.get());  // [n + 1, n_embd]
    const size_t n_embd = (size_t) H.n_embd;
    std::memcpy(s->last_h.data(), h + n_acc * n_embd, sizeof(float) * n_embd);
    std::vector<llama_token> catch_tokens(rows.begin() + 1, rows.begin() + 1 + n_acc);
    catch_tokens.push_back(next);
    mtp_catch_up(s, catch_tokens.data(), h, h + n_embd, catch_tokens.size(), P + 1);

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
        if (i < n_acc) {
            s->stats.accepted_at[i]++;
        }
    }
}
