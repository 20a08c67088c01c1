/* Round trip of one session command through a persistent bash, for two protocol lines:
 * the one the sidecar used until 2026-11-30 (sentinel printing written out in every line,
 * the command read by `read -d ''`) and the current one (`eval '<command>' </dev/null;
 * __sc_end $?`, with `__sc_end` defined once). Prints the p50 of each, twice, interleaved.
 *
 *   cc -O2 -o /tmp/bash_protocol sandbox-sidecar/bench/bash_protocol.c
 *   taskset -c 0 /tmp/bash_protocol     # driver and bash on one CPU: bash's own cost
 *   /tmp/bash_protocol                  # as scheduled, cross-CPU wake-ups included
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N "0123456789abcdef01234567"
#define MARK_OUT "\n__SC_" N "_0\n"
#define MARK_ERR "\n__SC_" N "_\n"

static const char SETUP[] =
    "__sc_end() { builtin printf '\\n__SC_" N "_%d\\n' \"$1\"; "
    "builtin printf '\\n__SC_" N "_\\n' >&2; }\n";
static const char OLD[] =
    "IFS= read -r -d '' __sc_cmd; eval \"$__sc_cmd\" </dev/null; __sc_rc=$?; "
    "printf '\\n__SC_" N "_%d\\n' \"$__sc_rc\"; printf '\\n__SC_" N "_\\n' >&2\n"
    "echo hello"; /* followed by the NUL that ends `read -d ''` */
static const char NEW[] = "eval 'echo hello' </dev/null; __sc_end $?\n";

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static int ends_with(const char *buf, size_t len, const char *suffix) {
  size_t n = strlen(suffix);
  return len >= n && memcmp(buf + len - n, suffix, n) == 0;
}

/* Reads fd until what was read ends with `mark`. */
static void read_until(int fd, const char *mark) {
  char buf[4096];
  size_t got = 0;
  while (!ends_with(buf, got, mark)) {
    ssize_t r = read(fd, buf + got, sizeof buf - got);
    if (r <= 0) {
      perror("read");
      exit(1);
    }
    got += (size_t)r;
    if (got > sizeof buf / 2) { /* keep the tail only */
      memmove(buf, buf + got - 64, 64);
      got = 64;
    }
  }
}

static double p50(const char *line, size_t len, int n) {
  int in[2], out[2], err[2];
  if (pipe(in) || pipe(out) || pipe(err)) {
    perror("pipe");
    exit(1);
  }
  pid_t pid = fork();
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    close(in[1]);
    close(out[0]);
    close(err[0]);
    execl("/bin/bash", "bash", "--noprofile", "--norc", (char *)NULL);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  close(err[1]);
  if (write(in[1], SETUP, strlen(SETUP)) < 0) exit(1);
  double *lat = malloc(sizeof(double) * (size_t)n);
  for (int i = 0; i < n; i++) {
    double t = now_ms();
    if (write(in[1], line, len) < 0) exit(1);
    read_until(out[0], MARK_OUT);
    read_until(err[0], MARK_ERR);
    lat[i] = now_ms() - t;
  }
  qsort(lat, (size_t)n, sizeof(double), cmp);
  double m = lat[n / 2];
  free(lat);
  close(in[1]);
  close(out[0]);
  close(err[0]);
  return m;
}

int main(void) {
  const int n = 3000;
  for (int rep = 0; rep < 2; rep++) {
    printf("old line (%zu bytes + command): p50 %.1f us\n", strlen(OLD) - 10,
           1e3 * p50(OLD, sizeof OLD, n)); /* sizeof: the NUL is sent */
    printf("new line (%zu bytes):           p50 %.1f us\n", strlen(NEW),
           1e3 * p50(NEW, strlen(NEW), n));
  }
  return 0;
}
