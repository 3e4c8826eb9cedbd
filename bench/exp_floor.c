/* How fast can a float64 exp within 1 ulp go on this CPU?  Hand-written AVX2 + FMA, for bench/exp_floor.py.
 *
 * Two designs, both on the kernels' argument range x <= 0 with the kernels' flush of results below
 * the normal range (x < log(2**-1022) -> 0):
 *   poly:  the kernel's own method (n = round(x / ln 2), degree-11 polynomial on |r| <= ln(2)/2,
 *          two Horner steps below an Estrin part), with 1, 2 or 4 vectors per loop iteration;
 *   table: 2**(j/64) from a 64-entry table (high and low parts, two gathers), degree-5 polynomial
 *          on |r| <= ln(2)/128.
 * The coefficients and tables come from exp_floor_tables.h, written by exp_floor.py from
 * iem_ref.accel._fastexp (no numbers are typed in here).
 *
 * Usage: exp_floor MODE [PASSES]    MODE: poly1 | poly2 | poly4 | table | check-poly | check-table
 *   timing modes print "ns_per_element <value>" (each pass maps a cache-resident 4096-element
 *   buffer x -> exp(x) - 1, which keeps x in (-1, 0]);
 *   check modes read doubles from stdin (one per line) and print exp(x) with 17 digits.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "exp_floor_tables.h" /* A[12], TH[64], TL[64], B[6], LOG2E, SHIFT, LN2_HI, LN2_LO, FLUSH */

static inline __m256d exp_poly(__m256d x) {
    const __m256d keep = _mm256_cmp_pd(x, _mm256_set1_pd(FLUSH), _CMP_NLT_UQ); /* not below the flush point (NaN kept) */
    const __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(LOG2E), _mm256_set1_pd(SHIFT));
    const __m256d n = _mm256_sub_pd(t, _mm256_set1_pd(SHIFT));
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
    const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2);
#define PAIR(a, b) _mm256_fmadd_pd(_mm256_set1_pd(A[b]), r, _mm256_set1_pd(A[a]))
    const __m256d low = _mm256_fmadd_pd(r2, PAIR(4, 5), PAIR(2, 3));
    const __m256d high = _mm256_fmadd_pd(r4, PAIR(10, 11), _mm256_fmadd_pd(r2, PAIR(8, 9), PAIR(6, 7)));
    const __m256d h = _mm256_fmadd_pd(r4, high, low);
    const __m256d p = _mm256_fmadd_pd(r, _mm256_fmadd_pd(r, h, _mm256_set1_pd(A[1])), _mm256_set1_pd(A[0]));
    const __m256i bits = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(_mm256_set1_pd(SHIFT)));
    const __m256i scale = _mm256_slli_epi64(_mm256_add_epi64(bits, _mm256_set1_epi64x(1023)), 52);
    return _mm256_and_pd(_mm256_mul_pd(p, _mm256_castsi256_pd(scale)), keep);
}

static inline __m256d exp_table(__m256d x) {
    const __m256d keep = _mm256_cmp_pd(x, _mm256_set1_pd(FLUSH), _CMP_NLT_UQ);
    const __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(64.0 * LOG2E), _mm256_set1_pd(SHIFT));
    const __m256d n = _mm256_sub_pd(t, _mm256_set1_pd(SHIFT));
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI / 64.0), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO / 64.0), r);
    const __m256i k = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(_mm256_set1_pd(SHIFT)));
    const __m256i j = _mm256_and_si256(k, _mm256_set1_epi64x(63));
    const __m256d th = _mm256_i64gather_pd(TH, j, 8);
    const __m256d tl = _mm256_i64gather_pd(TL, j, 8);
    const __m256d r2 = _mm256_mul_pd(r, r);
    const __m256d q = _mm256_fmadd_pd(
        r2,
        _mm256_fmadd_pd(r2, _mm256_fmadd_pd(_mm256_set1_pd(B[5]), r, _mm256_set1_pd(B[4])),
                        _mm256_fmadd_pd(_mm256_set1_pd(B[3]), r, _mm256_set1_pd(B[2]))),
        _mm256_mul_pd(r, _mm256_set1_pd(B[1])));
    const __m256d y = _mm256_add_pd(th, _mm256_fmadd_pd(th, q, tl));
    /* 2**(k >> 6): k + 1023 * 64 is positive on the kept range, so a logical shift serves */
    const __m256i scale = _mm256_slli_epi64(_mm256_srli_epi64(_mm256_add_epi64(k, _mm256_set1_epi64x(1023 * 64)), 6), 52);
    return _mm256_and_pd(_mm256_mul_pd(y, _mm256_castsi256_pd(scale)), keep);
}

#define LEN 4096
static double buf[LEN] __attribute__((aligned(64)));

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s poly1|poly2|poly4|table|check-poly|check-table [passes]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    if (strncmp(mode, "check-", 6) == 0) {
        const int table = strcmp(mode, "check-table") == 0;
        double in[4], out[4];
        int m = 0;
        while (1) {
            int got = scanf("%lf", &in[m]);
            if (got == 1) m++;
            if (m == 4 || (got != 1 && m > 0)) {
                for (int i = m; i < 4; i++) in[i] = 0.0;
                __m256d y = table ? exp_table(_mm256_loadu_pd(in)) : exp_poly(_mm256_loadu_pd(in));
                _mm256_storeu_pd(out, y);
                for (int i = 0; i < m; i++) printf("%.17g\n", out[i]);
                m = 0;
            }
            if (got != 1) break;
        }
        return 0;
    }
    const long passes = argc > 2 ? atol(argv[2]) : 20000;
    const __m256d one = _mm256_set1_pd(1.0);
    for (int i = 0; i < LEN; i++) buf[i] = -(i % 97) * 0.01;
    const double t0 = now();
    for (long p = 0; p < passes; p++) {
        if (strcmp(mode, "poly1") == 0) {
            for (int j = 0; j < LEN; j += 4) _mm256_store_pd(buf + j, _mm256_sub_pd(exp_poly(_mm256_load_pd(buf + j)), one));
        } else if (strcmp(mode, "poly2") == 0) {
            for (int j = 0; j < LEN; j += 8) {
                __m256d a = exp_poly(_mm256_load_pd(buf + j)), b = exp_poly(_mm256_load_pd(buf + j + 4));
                _mm256_store_pd(buf + j, _mm256_sub_pd(a, one));
                _mm256_store_pd(buf + j + 4, _mm256_sub_pd(b, one));
            }
        } else if (strcmp(mode, "poly4") == 0) {
            for (int j = 0; j < LEN; j += 16) {
                __m256d a = exp_poly(_mm256_load_pd(buf + j)), b = exp_poly(_mm256_load_pd(buf + j + 4));
                __m256d c = exp_poly(_mm256_load_pd(buf + j + 8)), d = exp_poly(_mm256_load_pd(buf + j + 12));
                _mm256_store_pd(buf + j, _mm256_sub_pd(a, one));
                _mm256_store_pd(buf + j + 4, _mm256_sub_pd(b, one));
                _mm256_store_pd(buf + j + 8, _mm256_sub_pd(c, one));
                _mm256_store_pd(buf + j + 12, _mm256_sub_pd(d, one));
            }
        } else if (strcmp(mode, "table") == 0) {
            for (int j = 0; j < LEN; j += 4) _mm256_store_pd(buf + j, _mm256_sub_pd(exp_table(_mm256_load_pd(buf + j)), one));
        } else {
            fprintf(stderr, "unknown mode %s\n", mode);
            return 2;
        }
    }
    const double dt = now() - t0;
    double check = 0.0;
    for (int i = 0; i < LEN; i++) check += buf[i];
    printf("ns_per_element %.6f checksum %.6g\n", dt / ((double)passes * LEN) * 1e9, check);
    return 0;
}
