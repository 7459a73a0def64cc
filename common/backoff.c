#include "common/backoff.h"

#include <stdlib.h>

double mx_backoff_delay(double base, double max, int attempt) {
  double delay = base;
  for (int i = 0; i < attempt && delay < max; i++)
    delay *= 2;
  if (delay > max)
    delay = max;
  delay *= 0.5 + (double)(random() % 1000) / 1000.0;
  return delay > max ? max : delay;
}
