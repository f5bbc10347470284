// One decode cycle for a set of sequences: the MTP heads draft for all of them
// together (one decode per head), then the target decodes every sequence's
// [pending, d1..dk] rows (or its pending token alone, draft 0) in as few decodes
// as exactness allows, and each sequence accepts, rolls back and guards its window.
//
// Exactness: a target decode holds only sequences with the same number of rows and
// consecutive ids, and at most k_rows_exact rows. llama.cpp splits a batch over KV
// streams by taking the same number of rows from consecutive streams; any other mix
// would cut a sequence's verify rows over ubatches (the sliding-window hazard) and
// lay out its cells differently from a decode of its own. The single-sequence verbs
// are this cycle with one sequence.
#include "internal.h"

#include <algorithm>
#include <cstring>

namespace {

struct planned {
    seq_state * sq;
    int32_t     k;      // drafts to verify (0: plain decode)
    size_t      slot;   // index into the caller's seqs / out
};

std::vector<planned> plan(pmtp_session * s, const int32_t * seqs, const int32_t * drafts, size_t n) {
    if (n == 0 || n > s->n_seq_max) {
        fail(PMTP_ERR_INVALID_ARG, "a step takes 1 to n_seq_max (" + std::to_string(s->n_seq_max) +
             ") sequences, got " + std::to_string(n));
    }
    std::vector<planned> items;
    std::vector<bool> seen(s->n_seq_max, false);
    for (size_t i = 0; i < n; ++i) {
        seq_state & sq = s->seq(seqs[i]);
        if (seen[(size_t) sq.id]) {
            fail(PMTP_ERR_INVALID_ARG, "sequence " + std::to_string(sq.id) + " appears twice in one step");
        }
        seen[(size_t) sq.id] = true;
        if (sq.pending < 0) {
            fail(PMTP_ERR_INVALID_ARG, "sequence " + std::to_string(sq.id) + " has no pending token: prefill and sample first");
        }
        if (drafts[i] < 0) {
            fail(PMTP_ERR_INVALID_ARG, "draft must be >= 0");
        }
        const int32_t room = (int32_t) s->n_ctx - sq.n_past() - 1;
        if (room < 0) {
            fail(PMTP_ERR_CONTEXT_FULL, "sequence " + std::to_string(sq.id) + " fills its context (n_ctx " +
                 std::to_string(s->n_ctx) + ")");
        }
        const int32_t k = s->heads ? std::min(std::min(drafts[i], s->params.draft_max), room) : 0;
        items.push_back({&sq, std::max(k, 0), i});
    }
    std::sort(items.begin(), items.end(), [](const planned & a, const planned & b) { return a.sq->id < b.sq->id; });
    return items;
}

// Consecutive runs of items that one target decode can hold: [begin, end) pairs.
std::vector<std::pair<size_t, size_t>> groups_of(const pmtp_session * s, const std::vector<planned> & items) {
    const int32_t max_rows = std::min<int32_t>((int32_t) s->n_ubatch, k_rows_exact);
    std::vector<std::pair<size_t, size_t>> out;
    size_t begin = 0;
    for (size_t i = 1; i <= items.size(); ++i) {
        const bool joins = i < items.size() && items[i].k == items[begin].k &&
                           items[i].sq->id == items[i - 1].sq->id + 1 &&
                           (int32_t) (i - begin + 1) * (items[i].k + 1) <= max_rows;
        if (!joins) {
            out.emplace_back(begin, i);
            begin = i;
        }
    }
    return out;
}

// A plain decode's result: the pending token joins the history, the next one is sampled.
void accept_plain(pmtp_session * s, seq_state & sq, int32_t row, pmtp_step_result * out) {
    sq.history.push_back(sq.pending);
    sq.pending = -1;
    if (s->heads) {
        const float * h = llama_get_embeddings_nextn_ith(s->ctx.get(), row);
        std::memcpy(sq.last_h.data(), h, sizeof(float) * (size_t) s->n_embd);
    }
    session_sample(s, sq, out, 0);
    s->stats.n_emitted += 1;
}

// A verify's outcome: accept -> result -> commit -> heads' rows -> statistics.
void accept_verified(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t k,
                     const float * q_probs, pmtp_step_result * out) {
    llama_token next = -1;
    const size_t n_acc = mtp_accepted(s, sq, row0, drafts, k, q_probs, next);
    mtp_result(s, sq, row0, drafts, k, n_acc, next, out);
    mtp_commit(s, sq, drafts, n_acc, next);
    mtp_queue_verified(s, sq, row0, drafts, n_acc);
    mtp_count(s, k, n_acc, q_probs != nullptr);
}

void run_group(pmtp_session * s, const std::vector<planned> & items, size_t begin, size_t end,
               const std::vector<llama_token> & drafts, pmtp_step_result * out) {
    const int32_t k = items[begin].k;
    target_rows rows;
    for (size_t i = begin; i < end; ++i) {
        seq_state & sq = *items[i].sq;
        rows.seqs.push_back(&sq);
        rows.row0.push_back((int32_t) rows.tokens.size());
        rows.n.push_back(k + 1);
        rows.tokens.push_back(sq.pending);
        const auto first = drafts.begin() + (ptrdiff_t) (i * PMTP_MAX_DRAFT);
        rows.tokens.insert(rows.tokens.end(), first, first + k);
    }
    const double t0 = now_s();
    target_decode_rows(s, rows, k > 0);
    for (size_t i = begin; i < end; ++i) {
        seq_state & sq = *items[i].sq;
        const int32_t row0 = rows.row0[i - begin];
        if (k == 0) {
            accept_plain(s, sq, row0, out + items[i].slot);
        } else {
            const float * q = rejection_mode(sq) ? mtp_draft_probs(s, sq) : nullptr;
            accept_verified(s, sq, row0, &drafts[i * PMTP_MAX_DRAFT], (size_t) k, q, out + items[i].slot);
        }
    }
    // only after every sequence has read its rows: a recovery decodes again
    for (size_t i = begin; i < end && k > 0; ++i) {
        guard_window(s, *items[i].sq);
    }
    (k > 0 ? s->stats.t_verify_s : s->stats.t_decode_s) += now_s() - t0;
}

}  // namespace

void session_step(pmtp_session * s, const int32_t * seqs, const int32_t * drafts, size_t n, pmtp_step_result * out) {
    std::vector<planned> items = plan(s, seqs, drafts, n);
    for (size_t i = 0; i < n; ++i) {
        std::memset(out + i, 0, sizeof(*out));
    }
    std::vector<llama_token> proposed(items.size() * PMTP_MAX_DRAFT, 0);  // [item][draft]
    std::vector<seq_state *> drafting;
    std::vector<int32_t> k;
    std::vector<size_t> index;
    for (size_t i = 0; i < items.size(); ++i) {
        if (items[i].k > 0) {
            drafting.push_back(items[i].sq);
            k.push_back(items[i].k);
            index.push_back(i);
        }
    }
    if (!drafting.empty()) {
        std::vector<llama_token> buf(drafting.size() * PMTP_MAX_DRAFT, 0);
        mtp_draft(s, drafting, k, buf.data());
        for (size_t r = 0; r < drafting.size(); ++r) {
            const auto first = buf.begin() + (ptrdiff_t) (r * PMTP_MAX_DRAFT);
            std::copy(first, first + PMTP_MAX_DRAFT, proposed.begin() + (ptrdiff_t) (index[r] * PMTP_MAX_DRAFT));
        }
    }
    for (const auto & g : groups_of(s, items)) {
        run_group(s, items, g.first, g.second, proposed, out);
    }
}

void session_verify(pmtp_session * s, seq_state & sq, const llama_token * drafts, size_t n, pmtp_step_result * out) {
    if (sq.pending < 0) {
        fail(PMTP_ERR_INVALID_ARG, "nothing to verify: sample a token first");
    }
    const llama_pos P = sq.n_past();
    if ((size_t) P + 1 > s->n_ctx) {
        fail(PMTP_ERR_CONTEXT_FULL, "context is full (n_ctx " + std::to_string(s->n_ctx) + ")");
    }
    n = std::min<size_t>(n, std::min<size_t>((size_t) s->params.draft_max, s->n_ctx - (size_t) P - 1));
    std::vector<llama_token> rows(n + 1);  // [pending, d1..dn]
    rows[0] = sq.pending;
    std::copy(drafts, drafts + n, rows.begin() + 1);
    const double t0 = now_s();
    target_decode(s, sq, rows.data(), n + 1, P, true);
    accept_verified(s, sq, 0, rows.data() + 1, n, nullptr, out);
    guard_window(s, sq);
    s->stats.t_verify_s += now_s() - t0;
}
