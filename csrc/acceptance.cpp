// Sampling distributions and the rejection-sampling verifier, pure functions over
// dense arrays so they can be tested on fabricated logits.
//
// Speculative sampling: a draft d drawn from the draft distribution q is accepted
// with probability min(1, p(d) / q(d)); on rejection the token is drawn from the
// normalised residual max(0, p - q); if every draft is accepted a bonus token is
// drawn from the target's next distribution. Each emitted token is then distributed
// exactly as the target's own sample would be.
#include "internal.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace {

// Indices of the candidates still in play, largest logit first.
std::vector<int32_t> sorted_ids(const float * logits, int32_t n_vocab) {
    std::vector<int32_t> ids((size_t) n_vocab);
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    return ids;
}

// softmax over logits[ids] at temperature t, written to probs (others 0).
void softmax_into(const float * logits, const std::vector<int32_t> & ids, float t, float * probs) {
    const float max_l = logits[ids[0]];
    double sum = 0.0;
    for (int32_t i : ids) {
        sum += std::exp((double) (logits[i] - max_l) / t);
    }
    for (int32_t i : ids) {
        probs[i] = (float) (std::exp((double) (logits[i] - max_l) / t) / sum);
    }
}

}  // namespace

void sampling_probs(const pmtp_sampling & sp, const float * logits, int32_t n_vocab, float * probs) {
    std::fill(probs, probs + n_vocab, 0.0f);
    std::vector<int32_t> ids = sorted_ids(logits, n_vocab);
    if (sp.temperature <= 0.0f) {
        probs[ids[0]] = 1.0f;
        return;
    }
    // The same order as the session's llama.cpp chain: top_k, top_p, min_p (all on the
    // untempered distribution), then temperature.
    if (sp.top_k > 0 && (size_t) sp.top_k < ids.size()) {
        ids.resize((size_t) sp.top_k);
    }
    std::vector<float> p1((size_t) n_vocab, 0.0f);
    if (sp.top_p < 1.0f) {
        softmax_into(logits, ids, 1.0f, p1.data());
        double cum = 0.0;
        size_t keep = ids.size();
        for (size_t i = 0; i < ids.size(); ++i) {
            cum += p1[(size_t) ids[i]];
            if (cum >= sp.top_p) {
                keep = i + 1;
                break;
            }
        }
        ids.resize(keep);
    }
    if (sp.min_p > 0.0f) {
        const float threshold = logits[ids[0]] + std::log(sp.min_p);
        size_t keep = 1;
        while (keep < ids.size() && logits[ids[keep]] >= threshold) {
            keep++;
        }
        ids.resize(keep);
    }
    softmax_into(logits, ids, sp.temperature, probs);
}

void seed_rng(std::mt19937_64 & rng, uint64_t seed) {
    // seed_seq spreads nearby seeds (0, 1, 2, ...) over the generator's whole state;
    // seeding with the integer alone gives visibly correlated first draws.
    std::seed_seq seq{(uint32_t) seed, (uint32_t) (seed >> 32), 0x9e3779b9u};
    rng.seed(seq);
}

llama_token sample_dense(const float * probs, int32_t n_vocab, std::mt19937_64 & rng) {
    double total = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        total += probs[i];
    }
    const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
    double cum = 0.0;
    int32_t last = 0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        if (probs[i] <= 0.0f) {
            continue;
        }
        cum += probs[i];
        last = i;
        if (u < cum) {
            return i;
        }
    }
    return last;
}

size_t rejection_verify(const float * p, const float * q, const llama_token * drafts, size_t n, int32_t n_vocab,
                        std::mt19937_64 & rng, llama_token & next) {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<float> residual((size_t) n_vocab);
    for (size_t j = 0; j < n; ++j) {
        const float * pj = p + j * (size_t) n_vocab;
        const float * qj = q + j * (size_t) n_vocab;
        const llama_token d = drafts[j];
        const double pd = pj[d], qd = qj[d];
        if (qd > 0.0 && unit(rng) * qd < pd) {
            continue;  // accepted with probability min(1, p/q)
        }
        double mass = 0.0;
        for (int32_t i = 0; i < n_vocab; ++i) {
            residual[(size_t) i] = std::max(0.0f, pj[i] - qj[i]);
            mass += residual[(size_t) i];
        }
        next = mass > 0.0 ? sample_dense(residual.data(), n_vocab, rng) : sample_dense(pj, n_vocab, rng);
        return j;
    }
    next = sample_dense(p + n * (size_t) n_vocab, n_vocab, rng);
    return n;
}

void fill_logprobs(const pmtp_sampling & sp, const float * logits, int32_t n_vocab, int32_t i, pmtp_step_result * out) {
    if (sp.n_logprobs < 0) {
        return;
    }
    const llama_token tok = out->tokens[i];
    const float max_l = *std::max_element(logits, logits + n_vocab);
    double sum = 0.0;
    for (int32_t t = 0; t < n_vocab; ++t) {
        sum += std::exp((double) (logits[t] - max_l));
    }
    const float lse = max_l + (float) std::log(sum);
    out->logprob[i] = logits[tok] - lse;
    const int32_t k = std::min(sp.n_logprobs, std::min<int32_t>(PMTP_MAX_TOP_LOGPROBS, n_vocab));
    out->n_top = k;
    if (k == 0) {
        return;
    }
    std::vector<int32_t> ids((size_t) n_vocab);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int32_t j = 0; j < k; ++j) {
        out->top_tokens[i][j]   = ids[(size_t) j];
        out->top_logprobs[i][j] = logits[ids[(size_t) j]] - lse;
    }
}
