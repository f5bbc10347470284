// Checks the vectorised quantize_row_q8_K (vendor patch 0027, arch/x86/quants.c) as compiled
// for whatever instruction set this file is built for (tests/test_kernels_isa.py) against
// upstream's scalar quantize_row_q8_K_ref from libggml-base: every block's scale, quants and
// (where the block is not all zero) bsums must have the reference's bits.
//
// Rows: Gaussian values at scales from 1e-30 to 1e30, blocks whose largest |x| comes twice
// with both signs (the first one sets the scale's sign), values one ulp apart at the top,
// halves that the rounding must break to even, zeros, negative zeros, subnormals, infinities
// and quiet NaNs.

#include "ggml-common.h"
#include "ggml-quants.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

extern "C" void quantize_row_q8_K(const float * x, void * y, int64_t k);

namespace {

int failures = 0;

void compare(const std::vector<float> & x, const std::string & what) {
    const size_t nb = x.size() / QK_K;
    std::vector<block_q8_K> got(nb), want(nb);
    std::memset(got.data(), 0x5a, nb * sizeof(block_q8_K));
    std::memset(want.data(), 0x5a, nb * sizeof(block_q8_K));
    quantize_row_q8_K(x.data(), got.data(), (int64_t) x.size());
    quantize_row_q8_K_ref(x.data(), want.data(), (int64_t) x.size());
    for (size_t b = 0; b < nb; ++b) {
        const bool zero_block = want[b].d == 0.0f && std::memcmp(&want[b].d, &got[b].d, sizeof(float)) == 0;
        const bool same = std::memcmp(&got[b].d, &want[b].d, sizeof(float)) == 0 &&
                          std::memcmp(got[b].qs, want[b].qs, sizeof(want[b].qs)) == 0 &&
                          (zero_block || std::memcmp(got[b].bsums, want[b].bsums, sizeof(want[b].bsums)) == 0);
        if (!same && failures < 20) {
            std::printf("FAIL %s: block %zu (d %a vs %a)\n", what.c_str(), b, got[b].d, want[b].d);
        }
        failures += !same;
        if (zero_block) {
            for (int16_t s : got[b].bsums) {
                if (s != 0) {
                    std::printf("FAIL %s: block %zu is all zero but a bsum is %d\n", what.c_str(), b, s);
                    ++failures;
                    break;
                }
            }
        }
    }
}

}  // namespace

int main() {
    std::mt19937 rng(20261207);
    std::normal_distribution<float> gauss(0.0f, 1.0f);
    std::uniform_int_distribution<int> pos(0, QK_K - 1);
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    int rows = 0;

    for (float scale : {1e-30f, 1e-6f, 0.01f, 1.0f, 37.5f, 1e6f, 1e30f}) {
        for (int n_blocks : {1, 2, 8, 32}) {
            for (int rep = 0; rep < 50; ++rep, ++rows) {
                std::vector<float> x((size_t) n_blocks * QK_K);
                for (float & v : x) v = scale * gauss(rng);
                for (int b = 0; b < n_blocks; ++b) {
                    float * blk = x.data() + (size_t) b * QK_K;
                    switch ((rep + b) % 7) {
                        case 0: {   // the largest |x| twice, with both signs, in either order
                            float top = 0.0f;
                            for (int j = 0; j < QK_K; ++j) top = std::fmax(top, std::fabs(blk[j]));
                            top *= 1.5f;
                            const int a = pos(rng), c = pos(rng);
                            blk[a] = (rep & 1) ? top : -top;
                            if (c != a) blk[c] = -blk[a];
                            break;
                        }
                        case 1: {   // two values one ulp apart at the top
                            const int a = pos(rng), c = pos(rng);
                            blk[a] = scale * 9.0f;
                            if (c != a) blk[c] = -std::nextafter(scale * 9.0f, inf);
                            break;
                        }
                        case 2:     // values whose products land on halves (127 / 254 * odd)
                            for (int j = 0; j < QK_K; ++j) blk[j] = (float) ((2 * (j % 127) + 1) - 127) / 2.0f;
                            blk[pos(rng)] = -127.0f;
                            break;
                        case 3:     // all zero, with negative zeros
                            for (int j = 0; j < QK_K; ++j) blk[j] = (j & 1) ? -0.0f : 0.0f;
                            break;
                        case 4:     // subnormals
                            for (int j = 0; j < QK_K; ++j) blk[j] = gauss(rng) * 1e-40f;
                            break;
                        case 5:     // an infinity
                            blk[pos(rng)] = (rep & 1) ? inf : -inf;
                            break;
                        case 6:     // a quiet NaN, not the largest element
                            blk[pos(rng)] = nan;
                            break;
                    }
                }
                compare(x, "scale " + std::to_string(scale) + ", " + std::to_string(n_blocks) + " blocks");
            }
        }
    }
    std::vector<float> only_nan(QK_K, nan);
    compare(only_nan, "a block of NaNs");
    ++rows;

    if (failures) {
        std::printf("%d blocks differ from the reference\n", failures);
        return 1;
    }
    std::printf("PASSED: %d rows, every block bit for bit the reference's\n", rows);
    return 0;
}
