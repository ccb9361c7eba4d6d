/* Prints one line per rank, then checks an MPI_Allreduce across all ranks.
 *
 * Output (rank 0 also prints the world size and the sum):
 *   rank R of N
 *   world size N
 *   allreduce sum S          S = N*(N+1)/2
 * Exits 1 when the sum is wrong.
 */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    int rank = 0;
    int size = 0;
    long contribution = 0;
    long sum = 0;
    long expected = 0;
    int status = 0;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    printf("rank %d of %d\n", rank, size);
    fflush(stdout);

    contribution = (long)rank + 1;
    MPI_Allreduce(&contribution, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    expected = (long)size * ((long)size + 1) / 2;

    if (rank == 0) {
        printf("world size %d\n", size);
        printf("allreduce sum %ld\n", sum);
        fflush(stdout);
    }
    if (sum != expected) {
        fprintf(stderr, "error: rank %d: allreduce sum %ld, expected %ld\n", rank, sum, expected);
        status = 1;
    }

    MPI_Finalize();
    return status;
}
