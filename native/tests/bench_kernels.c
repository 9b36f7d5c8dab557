/*
 * bench_kernels.c: nanoseconds per call of the forward and accumulate
 * kernels of each path, at d = 768, 2048, 4096 (n = 1). Built once per
 * accumulator count by `make bench` (ADL_ACC=1, 2, 4, 8) to show what the
 * independent accumulators buy.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../src/kernels.h"

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static float *fill(size_t n) {
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; ++i)
        p[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    return p;
}

int main(void) {
    const char *paths[] = {"scalar", "avx2", "neon"};
    const size_t ds[] = {768, 2048, 4096};
    printf("%-6s %5s %14s %14s %14s %14s\n", "path", "d", "fwd r1", "fwd r2 rowmaj",
           "fwd r2 rankmaj", "accum r2");
    for (int p = 0; p < 3; ++p) {
        const adl_kernels *K = adl_kernels_for(paths[p]);
        if (!K)
            continue;
        for (int di = 0; di < 3; ++di) {
            const size_t d = ds[di];
            float *x = fill(d), *A = fill(2 * d), *B = fill(2 * d), *out = fill(d);
            float *g = fill(d), *gA = fill(2 * d), *gB = fill(2 * d);
            double best[4] = {1e30, 1e30, 1e30, 1e30};
            const size_t iters = 20000;
            for (int rep = 0; rep < 5; ++rep) {
                double t0 = now_ns();
                for (size_t i = 0; i < iters; ++i)
                    K->fwd_r1(x, 1, d, A, B, d, 1e-3f, out);
                double t1 = now_ns();
                for (size_t i = 0; i < iters; ++i)
                    K->fwd_r2(x, 1, d, A, ADL_ROW_MAJOR, B, d, 1e-3f, out);
                double t2 = now_ns();
                for (size_t i = 0; i < iters; ++i)
                    K->fwd_r2(x, 1, d, A, ADL_RANK_MAJOR, B, d, 1e-3f, out);
                double t3 = now_ns();
                for (size_t i = 0; i < iters; ++i)
                    K->accumulate(x, g, 1, d, d, A, ADL_ROW_MAJOR, 2, B, 1e-6f, gA,
                                  ADL_ROW_MAJOR, gB);
                double t4 = now_ns();
                double t[4] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3};
                for (int k = 0; k < 4; ++k)
                    if (t[k] / iters < best[k])
                        best[k] = t[k] / iters;
            }
            printf("%-6s %5zu %11.1f ns %11.1f ns %11.1f ns %11.1f ns\n", K->name, d,
                   best[0], best[1], best[2], best[3]);
            free(x), free(A), free(B), free(out), free(g), free(gA), free(gB);
        }
    }
    return 0;
}
