#include "common/strmap.h"
#include "tests/unit/tap.h"

static void test_put_get_del(void) {
  mx_strmap m;
  mx_strmap_init(&m);
  int a = 1, b = 2;
  void *old;
  CHECK(mx_strmap_get(&m, "x", 1) == NULL);
  CHECK_INT(mx_strmap_put(&m, "!room:hs", 8, &a, &old), 0);
  CHECK(old == NULL);
  CHECK_INT(mx_strmap_put(&m, "!room:hs", 8, &b, &old), 0);
  CHECK(old == &a);
  CHECK(mx_strmap_get(&m, "!room:hs", 8) == &b);
  CHECK(mx_strmap_get(&m, "!room:h", 7) == NULL);
  CHECK(mx_strmap_del(&m, "!room:hs", 8) == &b);
  CHECK(mx_strmap_del(&m, "!room:hs", 8) == NULL);
  CHECK_INT(m.count, 0);
  mx_strmap_free(&m);
}

static int count_fn(const char *k, size_t len, void *v, void *ud) {
  (*(size_t *)ud)++;
  return 0;
}

static void test_grow_many(void) {
  mx_strmap m;
  mx_strmap_init(&m);
  char key[32];
  for (int i = 0; i < 10000; i++) {
    int n = snprintf(key, sizeof(key), "@user%d:hs", i);
    CHECK_INT(mx_strmap_put(&m, key, (size_t)n, (void *)(long)(i + 1), NULL),
              0);
  }
  CHECK_INT(m.count, 10000);
  int bad = 0;
  for (int i = 0; i < 10000; i++) {
    int n = snprintf(key, sizeof(key), "@user%d:hs", i);
    if (mx_strmap_get(&m, key, (size_t)n) != (void *)(long)(i + 1))
      bad++;
  }
  CHECK_INT(bad, 0);
  size_t seen = 0;
  mx_strmap_each(&m, count_fn, &seen);
  CHECK_INT(seen, 10000);
  mx_strmap_free(&m);
}

static void test_binary_keys(void) {
  mx_strmap m;
  mx_strmap_init(&m);
  int v = 7;
  CHECK_INT(mx_strmap_put(&m, "a\0b", 3, &v, NULL), 0);
  CHECK(mx_strmap_get(&m, "a\0b", 3) == &v);
  CHECK(mx_strmap_get(&m, "a", 1) == NULL);
  mx_strmap_free(&m);
}

static void test_seeded_hash(void) {
  mx_hash_seed(1, 2);
  uint64_t h1 = mx_hash("abc", 3);
  mx_hash_seed(3, 4);
  uint64_t h2 = mx_hash("abc", 3);
  CHECK(h1 != h2);
  CHECK(mx_hash("abc", 3) == h2);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_put_get_del), TAP_CASE(test_grow_many),
          TAP_CASE(test_binary_keys), TAP_CASE(test_seeded_hash));
}
