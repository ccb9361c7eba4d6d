/* Allreduce latency: mpi-latency MESSAGE_BYTES ITERATIONS
 *
 * Runs ITERATIONS/10 (at least 1) warm-up calls, then ITERATIONS timed calls of
 * MPI_Allreduce(MPI_SUM) on MESSAGE_BYTES bytes (rounded down to whole ints, at least one).
 * Rank 0 prints the mean time per call of the slowest rank, in microseconds:
 *   allreduce_latency_us BYTES VALUE
 */
#include <mpi.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

static long parse_positive(const char *text, const char *what, int rank)
{
    char *end = NULL;
    long value = 0;

    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value <= 0) {
        if (rank == 0) {
            fprintf(stderr, "mpi-latency: %s must be a positive integer, got '%s'\n", what, text);
        }
        return -1;
    }
    return value;
}

int main(int argc, char **argv)
{
    int rank = 0;
    long bytes = 0;
    long iterations = 0;
    long warmup = 0;
    long count = 0;
    long i = 0;
    int *send = NULL;
    int *recv = NULL;
    double start = 0.0;
    double elapsed = 0.0;
    double slowest = 0.0;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);

    if (argc != 3) {
        if (rank == 0) {
            fprintf(stderr, "usage: mpi-latency MESSAGE_BYTES ITERATIONS\n");
        }
        MPI_Finalize();
        return 2;
    }
    bytes = parse_positive(argv[1], "MESSAGE_BYTES", rank);
    iterations = parse_positive(argv[2], "ITERATIONS", rank);
    if (bytes < 0 || iterations < 0) {
        MPI_Finalize();
        return 2;
    }

    count = bytes / (long)sizeof(int);
    if (count < 1) {
        count = 1;
    }
    if (count > INT_MAX) {
        if (rank == 0) {
            fprintf(stderr, "mpi-latency: MESSAGE_BYTES %ld is too large\n", bytes);
        }
        MPI_Finalize();
        return 2;
    }
    send = malloc((size_t)count * sizeof(int));
    recv = malloc((size_t)count * sizeof(int));
    if (send == NULL || recv == NULL) {
        fprintf(stderr, "mpi-latency: rank %d: out of memory for %ld bytes\n", rank, bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    for (i = 0; i < count; i++) {
        send[i] = rank + 1;
    }

    warmup = iterations / 10;
    if (warmup < 1) {
        warmup = 1;
    }
    for (i = 0; i < warmup; i++) {
        MPI_Allreduce(send, recv, (int)count, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    }

    MPI_Barrier(MPI_COMM_WORLD);
    start = MPI_Wtime();
    for (i = 0; i < iterations; i++) {
        MPI_Allreduce(send, recv, (int)count, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    }
    elapsed = MPI_Wtime() - start;
    MPI_Reduce(&elapsed, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

    if (rank == 0) {
        printf("allreduce_latency_us %ld %.3f\n", bytes, slowest / (double)iterations * 1e6);
        fflush(stdout);
    }

    free(send);
    free(recv);
    MPI_Finalize();
    return 0;
}
