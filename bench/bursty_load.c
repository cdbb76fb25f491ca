// A bursty CPU load for in-process benchmarks: busy for BUSY_US, asleep for SLEEP_US, forever, like a server's
// request handling sharing the cores. Build and run beside a benchmark (BENCHMARKS.md):
//   gcc -O2 -o /tmp/bursty_load bench/bursty_load.c && /tmp/bursty_load 500 1500 &
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double NowUs(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s BUSY_US SLEEP_US\n", argv[0]);
    return 2;
  }
  const double busy_us = atof(argv[1]);
  const long sleep_ns = (long)(atof(argv[2]) * 1000);
  const struct timespec pause = {sleep_ns / 1000000000L, sleep_ns % 1000000000L};
  volatile double spin = 0;
  for (;;) {
    const double start = NowUs();
    while (NowUs() - start < busy_us) spin += 1;
    nanosleep(&pause, NULL);
  }
}
