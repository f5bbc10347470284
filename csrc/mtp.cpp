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
// Chained heads (step35) follow training: head j's row q pairs token[q] with head
// j - 1's hidden output of row q - 1 (head 0's with the target's h[q - 1]), so head j
// starts at row j + 1 and every head but the last keeps the hidden outputs of all its
// rows (its context reads back every row's hidden state, unmasked) until the next head
// has taken them. The last head, and the single head of qwen35 and friends, read back
// only the output row's, and their other rows skip the FFN (vendor/patches/0010).
//
// Drafting k tokens: chained head j runs its missing clean rows up to P plus the
// draft rows P+1 .. P+j (tokens d1..dj); its last row yields d_{j+1}. The single head
// runs its clean rows and row P once, then one row per further draft step, each
// pairing the previous draft with the head's own hidden output. Draft rows are
// "dirty" and are dropped before the head next runs, except that a chained head's
// draft rows whose tokens were all accepted are exactly its clean rows and stay.
//
// Verify: the target decodes [t, d1..dk] in one batch; tokens are sampled row by
// row with the session's sampler and drafts accepted while they match. The target
// keeps P .. P+n (n accepted), the new pending token s sits at P+n+1, and only the
// rows P+1 .. P+n+1 (accepted drafts, then s) join the queue; upstream re-runs all
// k+1 verify rows on every head after every verify, pairing every head with the
// target's hidden states.
//
// Each chained head has its own context, so its KV is never disturbed by another
// head's rows; upstream shares one context and relies on cells being reused in
// the same order after each removal.
//
// Several sequences: every head context holds all of them (seq id = the target's,
// one unified KV stream: head numbers only choose drafts, never the output), and
// drafting step j runs head j once for every sequence that drafts that far.
#include "internal.h"

#include "llama-ext.h"

#include <algorithm>
#include <cstring>

struct mtp_head {
    context_ptr ctx;
    batch_ptr   batch;
};

// One sequence's side of the heads.
struct mtp_seq {
    std::vector<int32_t>  n_kv;              // per head: positions [0, n_kv) are in its KV
    std::vector<int32_t>  n_clean;           // per head: clean rows [0, n_clean)

    // rows some head still lacks: position queue_pos0 + i pairs queue_tok[i] with queue_h[i]
    llama_pos                queue_pos0 = 0;
    std::vector<llama_token> queue_tok;
    std::vector<float>       queue_h;        // [queue_tok.size(), n_embd]

    std::vector<llama_token> d;              // drafts of the current cycle, [k]
    std::vector<float>    g;                 // hidden outputs, g[m] feeds d[m], [k, n_embd]
    std::vector<float>    q;                 // draft distributions (rejection sampling), [k, n_vocab]
    std::vector<float>    p;                 // target distributions of a verify, [k + 1, n_vocab]

    // chained heads but the last: hidden outputs of head j's rows [out_pos0[j], n_kv[j]),
    // the inputs of head j + 1
    std::vector<llama_pos>                out_pos0;
    std::vector<std::vector<float>>       out_h;
    // chained heads: the draft tokens of head j's rows draft_pos[j] + 1 .. (its last draft)
    std::vector<llama_pos>                draft_pos;
    std::vector<std::vector<llama_token>> draft_tok;

    int32_t window = 0;                      // the heads may skip rows older than the newest this many

    llama_pos queue_end() const { return queue_pos0 + (llama_pos) queue_tok.size(); }
};

struct mtp_heads {
    const pmtp_model *    model = nullptr;   // the model holding the MTP blocks
    std::vector<mtp_head> heads;
    bool                  chained = false;   // one trained head per draft step
    int32_t               n_embd  = 0;
    int32_t               n_vocab = 0;
    std::vector<mtp_seq>  seqs;              // [n_seq_max]

    const float * queue_row(const mtp_seq & m, llama_pos pos) const {
        return m.queue_h.data() + (size_t) (pos - m.queue_pos0) * n_embd;
    }
    // head j keeps every row's hidden output for head j + 1
    bool keeps_outputs(size_t j) const { return chained && j + 1 < heads.size(); }
    // first row head j runs: row 0 has no hidden state before it, and head j's row q
    // needs head j - 1's row q - 1
    llama_pos first_row(size_t j) const { return chained ? (llama_pos) j + 1 : 1; }
    // hidden input of head j's row pos
    const float * input_row(const mtp_seq & m, size_t j, llama_pos pos) const {
        if (!chained || j == 0) {
            return queue_row(m, pos);
        }
        const llama_pos r = pos - 1;
        if (r < m.out_pos0[j - 1] || r >= m.n_kv[j - 1]) {
            fail(PMTP_ERR_INTERNAL, "MTP head " + std::to_string(j) + " lacks head " + std::to_string(j - 1) +
                 "'s output of row " + std::to_string(r));
        }
        return m.out_h[j - 1].data() + (size_t) (r - m.out_pos0[j - 1]) * n_embd;
    }
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

// all_hidden: the head's context reads back every row's hidden state (unmasked).
mtp_head make_head(pmtp_session * s, const pmtp_model * m, int32_t offset, bool all_hidden) {
    llama_context_params cp = llama_context_default_params();
    cp.ctx_type        = LLAMA_CONTEXT_TYPE_MTP;
    cp.n_ctx           = s->n_ctx * s->n_seq_max;
    cp.n_batch         = s->n_batch;
    cp.n_ubatch        = s->n_ubatch;
    cp.n_seq_max       = s->n_seq_max;
    cp.n_threads       = s->params.n_threads;
    cp.n_threads_batch = s->params.n_threads_batch;
    cp.flash_attn_type = (llama_flash_attn_type) s->params.flash_attn;
    cp.no_perf         = true;
    cp.kv_unified      = true;
    if (s->params.type_k >= 0) cp.type_k = (ggml_type) s->params.type_k;
    if (s->params.type_v >= 0) cp.type_v = (ggml_type) s->params.type_v;

    mtp_head head;
    {
        asserts_throw checked;
        head.ctx.reset(llama_init_from_model(m->model.get(), cp));
    }
    if (!head.ctx) {
        fail(PMTP_ERR_MTP, "could not create the MTP context for " + m->path + " (see the log)");
    }
    llama_set_embeddings_nextn(head.ctx.get(), true, /*masked=*/ !all_hidden);
    llama_set_nextn_layer_offset(head.ctx.get(), offset);
    head.batch.reset(llama_batch_ext_init(head.ctx.get()));
    return head;
}

llama_token argmax(const float * logits, int32_t n) {
    return (llama_token) (std::max_element(logits, logits + n) - logits);
}

// Row p lives at KV position p - 1 (row 0 is never stored); n_kv counts rows.
llama_pos kv_pos(llama_pos row) { return std::max<llama_pos>(0, row - 1); }

// A head's rows end at n (its KV, and its kept hidden outputs with it).
void set_n_kv(mtp_heads & H, mtp_seq & m, size_t j, int32_t n) {
    m.n_kv[j] = n;
    if (H.keeps_outputs(j)) {
        m.out_pos0[j] = std::min(m.out_pos0[j], n);
        m.out_h[j].resize((size_t) (n - m.out_pos0[j]) * H.n_embd);
    }
}

void head_truncate(mtp_heads & H, size_t j, const seq_state & sq, int32_t n_keep) {
    mtp_seq & m = H.seqs[(size_t) sq.id];
    if (m.n_kv[j] > n_keep) {
        llama_memory_seq_rm(llama_get_memory(H.heads[j].ctx.get()), sq.id, kv_pos(n_keep), -1);
        set_n_kv(H, m, j, n_keep);
        m.draft_tok[j].clear();
    }
}

// One row for a head: token at pos of a sequence, paired with hidden input h.
struct head_row {
    seq_state *   sq;
    llama_token   token;
    llama_pos     pos;
    const float * h;
    bool          output;   // the row whose output drafts the next token
};

// Run rows on head j, in decodes of up to n_batch rows; on_output(row, batch index)
// is called for every output row right after its decode.
template <typename OnOutput>
void head_process(pmtp_session * s, size_t j, const std::vector<head_row> & rows, OnOutput on_output) {
    mtp_heads & H = *s->heads;
    mtp_head & h = H.heads[j];
    for (size_t off = 0; off < rows.size(); off += s->n_batch) {
        const size_t n = std::min<size_t>(s->n_batch, rows.size() - off);
        llama_batch_ext * b = h.batch.get();
        llama_batch_ext_clear(b);
        for (size_t i = off; i < off + n; ++i) {
            const head_row & r = rows[i];
            const int32_t idx = llama_batch_ext_add_token(b, r.sq->id, r.token);
            const llama_pos pos = kv_pos(r.pos);
            llama_batch_ext_set_pos(b, idx, &pos);
            llama_batch_ext_set_embd_token(b, idx, {r.h, 1, (size_t) H.n_embd});
            if (r.output || i + 1 == off + n) {
                llama_batch_ext_set_output_logits(b, idx, true);
            }
        }
        for (size_t i = off; i < off + n; ++i) {  // the rows may land in the KV, whatever happens
            mtp_seq & m = H.seqs[(size_t) rows[i].sq->id];
            set_n_kv(H, m, j, std::max(m.n_kv[j], rows[i].pos + 1));
        }
        const int32_t rc = llama_process(h.ctx.get(), LLAMA_PROCESS_TYPE_DECODE, b);
        if (rc != 0) {
            // drop what may have landed: each sequence keeps what came before this decode
            for (size_t i = off; i < off + n; ++i) {
                mtp_seq & m = H.seqs[(size_t) rows[i].sq->id];
                if (rows[i].pos < m.n_kv[j]) {
                    llama_memory_seq_rm(llama_get_memory(h.ctx.get()), rows[i].sq->id, kv_pos(rows[i].pos), -1);
                    set_n_kv(H, m, j, rows[i].pos);
                    m.draft_tok[j].clear();
                }
                m.n_clean[j] = std::min(m.n_clean[j], m.n_kv[j]);
            }
            fail(rc == 1 ? PMTP_ERR_CONTEXT_FULL : PMTP_ERR_DECODE,
                 "MTP head decode failed with status " + std::to_string(rc));
        }
        rpc_check_decode(H.model, h.ctx.get());
        if (H.keeps_outputs(j)) {
            for (size_t i = off; i < off + n; ++i) {
                mtp_seq & m = H.seqs[(size_t) rows[i].sq->id];
                const float * hid = llama_get_embeddings_nextn_ith(h.ctx.get(), (int32_t) (i - off));
                if (!hid || rows[i].pos < m.out_pos0[j]) {
                    fail(PMTP_ERR_INTERNAL, "MTP head " + std::to_string(j) + " produced no hidden state");
                }
                std::memcpy(m.out_h[j].data() + (size_t) (rows[i].pos - m.out_pos0[j]) * H.n_embd, hid,
                            sizeof(float) * (size_t) H.n_embd);
            }
        }
        for (size_t i = off; i < off + n; ++i) {
            if (rows[i].output) {
                on_output(rows[i], (int32_t) (i - off));
            }
        }
    }
}

// The clean rows [n_clean[j], end) of a sequence for head j, then (chained heads) the
// draft rows end .. end + extra - 1 with tokens d[0..extra).
void add_head_rows(mtp_heads & H, size_t j, seq_state & sq, llama_pos end, int32_t extra, bool output,
                   std::vector<head_row> & rows) {
    mtp_seq & m = H.seqs[(size_t) sq.id];
    head_truncate(H, j, sq, m.n_clean[j]);
    for (llama_pos pos = std::max(m.n_clean[j], H.first_row(j)); pos < end; ++pos) {
        rows.push_back({&sq, m.queue_tok[(size_t) (pos - m.queue_pos0)], pos, H.input_row(m, j, pos), false});
    }
    for (int32_t i = 0; i < extra; ++i) {
        if (end + i >= std::max(H.first_row(j), m.n_clean[j])) {  // (rows in a gap: none)
            rows.push_back({&sq, m.d[(size_t) i], end + i, H.input_row(m, j, end + i), false});
        }
    }
    if (output && !rows.empty()) {
        rows.back().output = true;
    }
}

// Output of a head's row: its hidden state goes to g_out, and the draft token is the
// head's greedy choice, or (rejection sampling) a draw from the head's distribution q
// after the sequence's sampler transforms, kept in q_out.
llama_token head_output(pmtp_session * s, mtp_head & h, int32_t idx, seq_state & sq, float * g_out, float * q_out) {
    const float * logits = llama_get_logits_ith(h.ctx.get(), idx);
    const float * hid    = llama_get_embeddings_nextn_ith(h.ctx.get(), idx);
    if (!logits || !hid) {
        fail(PMTP_ERR_INTERNAL, "MTP head produced no output");
    }
    std::memcpy(g_out, hid, sizeof(float) * (size_t) s->heads->n_embd);
    if (q_out) {
        sampling_probs(sq.sampling, logits, s->heads->n_vocab, q_out);
        return sample_dense(q_out, s->heads->n_vocab, sq.rng);
    }
    return argmax(logits, s->heads->n_vocab);
}

// Drop queued rows that every head has taken; the newest row stays so that a head
// can always run it again (a second pmtp_draft from the same pending token). Hidden
// outputs a chained head keeps go once the next head has taken them.
void queue_trim(mtp_heads & H, mtp_seq & m) {
    const llama_pos base = std::min(*std::min_element(m.n_clean.begin(), m.n_clean.end()), m.queue_end() - 1);
    if (base > m.queue_pos0) {
        const size_t n = (size_t) (base - m.queue_pos0);
        m.queue_tok.erase(m.queue_tok.begin(), m.queue_tok.begin() + n);
        m.queue_h.erase(m.queue_h.begin(), m.queue_h.begin() + n * H.n_embd);
        m.queue_pos0 = base;
    }
    for (size_t j = 0; H.keeps_outputs(j); ++j) {
        // head j + 1 next needs row n_clean[j + 1] - 1; one more stays for a rollback
        // that forgets the pending token
        const llama_pos keep = std::min(m.n_clean[j + 1] - 2, m.n_kv[j]);
        if (keep > m.out_pos0[j]) {
            m.out_h[j].erase(m.out_h[j].begin(), m.out_h[j].begin() + (size_t) (keep - m.out_pos0[j]) * H.n_embd);
            m.out_pos0[j] = keep;
        }
    }
}

// The heads skip the queued rows before row b: head j's next row becomes b (chained: b + j,
// whose input is head j - 1's output of row b + j - 1, which head j - 1 computes first).
// Its KV keeps a gap before that row; positions stay the rows' own, so attention and RoPE
// see the rows that are there where they belong. A head's uncommitted draft rows go first
// (they would otherwise sit inside the gap).
void mtp_skip_rows(pmtp_session * s, const seq_state & sq, llama_pos b) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    if (m.n_clean[0] < b) {
        s->stats.n_rows_skipped += (uint64_t) (b - std::max(m.n_clean[0], H.first_row(0)));
    }
    for (size_t j = 0; j < H.heads.size(); ++j) {
        const llama_pos start = b + (H.chained ? (llama_pos) j : 0);
        if (m.n_clean[j] >= start) {
            continue;
        }
        head_truncate(H, j, sq, m.n_clean[j]);
        m.n_clean[j] = m.n_kv[j] = start;
        if (H.keeps_outputs(j)) {               // outputs before the gap are never read again
            m.out_pos0[j] = start;
            m.out_h[j].clear();
        }
    }
    queue_trim(H, m);
}

// Every head takes the sequence's queued rows now (long stretches without drafting).
void mtp_flush(pmtp_session * s, seq_state & sq) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    const double t0 = now_s();
    for (size_t j = 0; j < H.heads.size(); ++j) {
        if (m.n_clean[j] < m.queue_end()) {
            std::vector<head_row> rows;
            add_head_rows(H, j, sq, m.queue_end(), 0, false, rows);
            head_process(s, j, rows, [](const head_row &, int32_t) {});
            m.n_clean[j] = m.queue_end();
        }
    }
    queue_trim(H, m);
    s->stats.t_catchup_s += now_s() - t0;
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
    const int32_t n_heads = h->chained ? draft_max : 1;
    s->heads = std::move(h);
    for (int32_t i = 0; i < n_heads; ++i) {
        s->heads->heads.push_back(make_head(s, m, i, s->heads->chained && i + 1 < n_heads));
    }
    mtp_heads & H = *s->heads;
    H.seqs.resize(s->n_seq_max);
    for (mtp_seq & q : H.seqs) {
        q.n_kv.assign(H.heads.size(), 0);
        q.n_clean.assign(H.heads.size(), 0);
        q.out_pos0.assign(H.heads.size(), 0);
        q.out_h.assign(H.heads.size(), {});
        q.draft_pos.assign(H.heads.size(), -1);
        q.draft_tok.assign(H.heads.size(), {});
        q.d.assign((size_t) draft_max + 1, 0);
        q.g.assign((size_t) (draft_max + 1) * H.n_embd, 0.0f);
        q.q.assign((size_t) (draft_max + 1) * H.n_vocab, 0.0f);
        q.p.assign((size_t) (draft_max + 1) * H.n_vocab, 0.0f);
    }
}

void mtp_reset(pmtp_session * s, const seq_state & sq) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    for (size_t j = 0; j < H.heads.size(); ++j) {
        llama_memory_t mem = llama_get_memory(H.heads[j].ctx.get());
        if (s->n_seq_max == 1) {
            llama_memory_clear(mem, true);
        } else {
            llama_memory_seq_rm(mem, sq.id, -1, -1);
        }
        m.n_kv[j] = m.n_clean[j] = m.out_pos0[j] = 0;
        m.out_h[j].clear();
        m.draft_tok[j].clear();
    }
    m.queue_pos0 = 0;
    m.queue_tok.clear();
    m.queue_h.clear();
    m.window = 0;
}

void mtp_set_window(pmtp_session * s, const seq_state & sq, int32_t n_rows) {
    mtp_heads & H = *s->heads;
    // head j (chained) starts again at row b + j <= the newest row: at least heads + 1 rows
    H.seqs[(size_t) sq.id].window = n_rows > 0 ? std::max(n_rows, (int32_t) H.heads.size() + 1) : 0;
}

int32_t mtp_rollback_redo(const pmtp_session * s, const seq_state & sq) {
    const mtp_heads & H = *s->heads;
    // While the sequence decodes plainly its heads skip old rows anyway: nothing is decoded
    // again, and every head starts after a gap (mtp_rollback_gap), rather than the target
    // decoding a kept token (the next row's hidden state) or one per chained head again. A
    // recurrent target decodes one token all the same: that decode keeps its snapshots
    // where a later rollback can reach them (session_rollback).
    if (H.seqs[(size_t) sq.id].window > 0) {
        return s->recurrent ? 1 : 0;
    }
    return H.chained ? (int32_t) H.heads.size() : 1;
}

void mtp_rollback_gap(pmtp_session * s, const seq_state & sq, int32_t n_keep) {
    mtp_rollback(s, sq, n_keep, n_keep, false);
    // Row n_keep still comes to the queue (from the next prefill, paired with a stale hidden
    // state), but no head takes it: head j starts again at row n_keep + 1 + j.
    mtp_skip_rows(s, sq, n_keep + 1);
}

void mtp_rollback(pmtp_session * s, const seq_state & sq, int32_t n_keep, int32_t first, bool redecoded) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    for (size_t j = 0; j < H.heads.size(); ++j) {
        // chained head j's row first + j is the first that needs a row the queue gets again
        const llama_pos keep = std::min(n_keep, first + (H.chained ? (llama_pos) j : 0));
        m.n_clean[j] = std::min(m.n_clean[j], keep);
        head_truncate(H, j, sq, m.n_clean[j]);
    }
    if (m.queue_end() > first) {
        const size_t keep = (size_t) std::max<llama_pos>(0, first - m.queue_pos0);
        m.queue_tok.resize(keep);
        m.queue_h.resize(keep * H.n_embd);
        m.queue_pos0 = std::min(m.queue_pos0, first);
    }
    if (redecoded && H.chained && first + (llama_pos) H.heads.size() - 1 > n_keep) {
        // Fewer rows come again than the chain re-runs: head j's row n_keep would need head
        // j - 1's output of row n_keep - 1, which no head computes again. Head j starts
        // again at row first + j instead, after a gap in its rows.
        mtp_skip_rows(s, sq, first);
    }
}

void mtp_push_rows(pmtp_session * s, seq_state & sq, const llama_token * tokens, const float * h_prev_first,
                   const float * h_rows, size_t n, llama_pos pos0) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    if (pos0 != m.queue_end()) {
        fail(PMTP_ERR_INTERNAL, "MTP queue out of step: row " + std::to_string(pos0) + " after " +
             std::to_string(m.queue_end()));
    }
    const size_t n_embd = (size_t) H.n_embd;
    for (size_t i = 0; i < n; ++i) {
        const float * h = i == 0 ? h_prev_first : h_rows + (i - 1) * n_embd;
        m.queue_tok.push_back(tokens[i]);
        m.queue_h.insert(m.queue_h.end(), h, h + n_embd);
    }
    // Long stretches without drafting (prefill, draft=0) are taken in large batches, or
    // skipped but for the newest rows while a policy decodes plainly (pmtp_seq_mtp_window).
    // The queue is cut back to the window once it holds a quarter more (at least two rows
    // more): a switch to drafting catches up on little beyond the window, and the cut, a
    // move of the kept rows, runs only every few steps.
    const size_t slack = std::max<size_t>(2, (size_t) m.window / 4);
    if (m.window > 0 && m.queue_tok.size() >= (size_t) m.window + slack) {
        mtp_skip_rows(s, sq, m.queue_end() - m.window);
    } else if (m.queue_tok.size() > s->n_batch) {
        mtp_flush(s, sq);
    }
}

void mtp_catch_up(pmtp_session * s, seq_state & sq) {
    if (s->heads) {
        mtp_flush(s, sq);
    }
}

int32_t mtp_queued(const pmtp_session * s, const seq_state & sq) {
    if (!s->heads) {
        return 0;
    }
    const mtp_heads & H = *s->heads;
    const mtp_seq & m = H.seqs[(size_t) sq.id];
    llama_pos most = 0;
    for (size_t j = 0; j < H.heads.size(); ++j) {
        most = std::max(most, m.queue_end() - m.n_clean[j]);
    }
    // and the rows a rollback deferred (its first one is queued)
    return (int32_t) most + std::max(0, sq.n_deferred - 1);
}

void mtp_draft(pmtp_session * s, const std::vector<seq_state *> & seqs, const std::vector<int32_t> & k,
               llama_token * out) {
    mtp_heads & H = *s->heads;
    int32_t k_max = 0;
    for (size_t r = 0; r < seqs.size(); ++r) {
        seq_state & sq = *seqs[r];
        mtp_seq & m = H.seqs[(size_t) sq.id];
        const llama_pos P = sq.n_past();
        if (sq.pending < 0 || m.queue_end() != P + 1) {
            fail(PMTP_ERR_INVALID_ARG, "nothing to draft from: sample a token first");
        }
        m.n_clean[0] = std::min(m.n_clean[0], P);  // row P always runs: its output is d1
        for (size_t j = 1; j < m.n_clean.size(); ++j) {
            // chained head j's last row, P + j, always runs (its output is d_{j+1}); rows
            // past P + 1 are clean only after a gap (mtp_skip_rows): the head then starts
            // at its first row after the gap, among the draft rows
            m.n_clean[j] = std::min(m.n_clean[j], P + (llama_pos) j);
        }
        k_max = std::max(k_max, k[r]);
    }
    const double t0 = now_s();
    for (int32_t j = 0; j < k_max; ++j) {
        const size_t head = H.chained ? (size_t) j : 0;
        std::vector<head_row> rows;
        for (size_t r = 0; r < seqs.size(); ++r) {
            if (k[r] <= j) {
                continue;
            }
            seq_state & sq = *seqs[r];
            mtp_seq & m = H.seqs[(size_t) sq.id];
            const llama_pos P = sq.n_past();
            if (H.chained || j == 0) {
                add_head_rows(H, head, sq, P + 1, j, true, rows);  // clean rows .. P, then drafts P+1 .. P+j
            } else {  // one more row on the single head
                rows.push_back({&sq, m.d[(size_t) j - 1], P + j, m.g.data() + (size_t) (j - 1) * H.n_embd, true});
            }
        }
        head_process(s, head, rows, [&](const head_row & row, int32_t idx) {
            mtp_seq & m = H.seqs[(size_t) row.sq->id];
            float * q = rejection_mode(*row.sq) ? m.q.data() + (size_t) j * H.n_vocab : nullptr;
            m.d[(size_t) j] = head_output(s, H.heads[head], idx, *row.sq, m.g.data() + (size_t) j * H.n_embd, q);
        });
        for (size_t r = 0; r < seqs.size() && (H.chained || j == 0); ++r) {
            if (k[r] > j) {
                mtp_seq & m = H.seqs[(size_t) seqs[r]->id];
                m.n_clean[head] = std::max(m.n_clean[head], seqs[r]->n_past() + 1);  // (a gap stays)
                if (H.chained) {
                    m.draft_pos[head] = seqs[r]->n_past();
                    m.draft_tok[head].assign(m.d.begin(), m.d.begin() + j);
                }
            }
        }
    }
    for (size_t r = 0; r < seqs.size(); ++r) {
        mtp_seq & m = H.seqs[(size_t) seqs[r]->id];
        queue_trim(H, m);
        std::copy(m.d.begin(), m.d.begin() + k[r], out + r * PMTP_MAX_DRAFT);
    }
    s->stats.t_draft_s += now_s() - t0;
}

const float * mtp_draft_probs(pmtp_session * s, const seq_state & sq) {
    return s->heads->seqs[(size_t) sq.id].q.data();
}

const float * mtp_head_logits(const pmtp_session * s, int32_t head) {
    const mtp_heads & H = *s->heads;
    if (head < 0 || (size_t) head >= H.heads.size()) {
        fail(PMTP_ERR_INVALID_ARG, "head " + std::to_string(head) + " out of range [0, " +
             std::to_string(H.heads.size()) + ")");
    }
    bool ran = false;
    for (const auto & m : H.seqs) {
        ran = ran || m.n_kv[(size_t) head] > 0;
    }
    const float * logits = ran ? llama_get_logits_ith(H.heads[(size_t) head].ctx.get(), -1) : nullptr;
    if (!logits) {
        fail(PMTP_ERR_INVALID_ARG, "MTP head " + std::to_string(head) + " has no output yet: call pmtp_draft first");
    }
    return logits;
}

bool rejection_mode(const seq_state & sq) {
    return sq.sampling.accept == 1 && sq.sampling.temperature > 0.0f;
}

namespace {

// Match rule: sample each row with the sequence's sampler; accept while it equals the draft.
size_t accept_matching(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                       llama_token & next) {
    for (size_t j = 0; j <= n; ++j) {
        const llama_token tok = llama_sampler_sample(sq.sampler.get(), s->ctx.get(), row0 + (int32_t) j);
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
size_t accept_rejection(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                        const float * q, llama_token & next) {
    mtp_heads & H = *s->heads;
    mtp_seq & m = H.seqs[(size_t) sq.id];
    for (size_t j = 0; j <= n; ++j) {
        sampling_probs(sq.sampling, llama_get_logits_ith(s->ctx.get(), row0 + (int32_t) j), H.n_vocab,
                       m.p.data() + j * (size_t) H.n_vocab);
    }
    const size_t n_acc = rejection_verify(m.p.data(), q, drafts, n, H.n_vocab, sq.rng, next);
    for (size_t j = 0; j < n_acc; ++j) {
        llama_sampler_accept(sq.sampler.get(), drafts[j]);
    }
    llama_sampler_accept(sq.sampler.get(), next);
    return n_acc;
}

}  // namespace

size_t mtp_accepted(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                    const float * q_probs, llama_token & next) {
    return q_probs ? accept_rejection(s, sq, row0, drafts, n, q_probs, next)
                   : accept_matching(s, sq, row0, drafts, n, next);
}

void mtp_result(pmtp_session * s, const seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                size_t n_acc, llama_token next, pmtp_step_result * out) {
    for (size_t j = 0; j < n_acc; ++j) {
        out->tokens[j]     = drafts[j];
        out->from_draft[j] = true;
    }
    out->tokens[n_acc]     = next;
    out->from_draft[n_acc] = false;
    out->n_tokens   = (int32_t) n_acc + 1;
    out->n_drafted  = (int32_t) n;
    out->n_accepted = (int32_t) n_acc;
    for (size_t j = 0; j <= n_acc; ++j) {  // token j was sampled from verify row j
        fill_logprobs(sq.sampling, llama_get_logits_ith(s->ctx.get(), row0 + (int32_t) j), s->n_vocab, (int32_t) j, out);
    }
}

void mtp_commit(pmtp_session * s, seq_state & sq, const llama_token * drafts, size_t n_acc, llama_token next) {
    mtp_heads & H = *s->heads;
    const llama_pos P = sq.n_past();
    // Keep [0, P + n_acc]: the pending token and the accepted drafts.
    llama_memory_seq_rm(s->mem(), sq.id, P + 1 + (llama_pos) n_acc, -1);

    // A chained head's draft rows whose tokens were all accepted are its clean rows.
    mtp_seq & m = H.seqs[(size_t) sq.id];
    for (size_t j = 0; H.chained && j < H.heads.size(); ++j) {
        const auto & used = m.draft_tok[j];
        if (m.draft_pos[j] != P || m.n_clean[j] != P + 1 || m.n_kv[j] != P + 1 + (llama_pos) used.size()) {
            continue;
        }
        size_t same = 0;
        while (same < used.size() && same < n_acc && used[same] == drafts[same]) {
            ++same;
        }
        m.n_clean[j] = P + 1 + (llama_pos) same;
    }
    sq.history.push_back(sq.pending);
    sq.history.insert(sq.history.end(), drafts, drafts + n_acc);
    sq.pending = next;
}

void mtp_queue_verified(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n_acc) {
    // Rows P+1 .. P+n_acc+1 (the accepted drafts, then the new pending token), each with the
    // hidden state of the verify row before it.
    const size_t n_embd = (size_t) s->heads->n_embd;
    const llama_pos P = sq.n_past() - 1 - (llama_pos) n_acc;
    const float * h = llama_get_embeddings_nextn(s->ctx.get()) + (size_t) row0 * n_embd;  // [n + 1, n_embd]
    std::memcpy(sq.last_h.data(), h + n_acc * n_embd, sizeof(float) * n_embd);
    std::vector<llama_token> new_rows(drafts, drafts + n_acc);
    new_rows.push_back(sq.pending);
    mtp_push_rows(s, sq, new_rows.data(), h, h + n_embd, new_rows.size(), P + 1);
}

void mtp_count(pmtp_session * s, size_t n, size_t n_acc, bool rejection) {
    s->stats.n_steps++;
    s->stats.n_drafted  += n;
    s->stats.n_accepted += n_acc;
    s->stats.n_emitted  += n_acc + 1;
    for (size_t i = 0; i < n && i < PMTP_MAX_DRAFT; ++i) {
        s->stats.drafted_at[i]++;
        s->stats.accepted_at[i] += i < n_acc;
        if (rejection) {
            s->stats.drafted_at_rejection[i]++;
            s->stats.accepted_at_rejection[i] += i < n_acc;
        }
    }
}
