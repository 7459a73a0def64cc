#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/chunk.h"
#include "common/error.h"
#include "sync/replay.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)
#define KEY S("stream-key-A")

static mx_chunk *event_of(const char *text) {
  return mx_chunk_new(text, strlen(text));
}

static void test_put_get(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_chunk *ev = event_of("id: Q\ndata: {}\n\n");
  CHECK_INT(mx_replay_put(rb, KEY, S("P"), S("Q"), ev, 10.0), 0);
  CHECK_INT(ev->refs, 2); /* the buffer's own reference */
  mx_chunk *got = NULL;
  mx_buf nb;
  mx_buf_init(&nb, 256);
  CHECK_INT(mx_replay_get(rb, KEY, S("P"), 11.0, &got, &nb), 0);
  CHECK(got == ev);
  CHECK_INT(ev->refs, 3);
  CHECK_MEMEQ(nb.data, nb.len, "Q", 1);
  mx_chunk_unref(got);
  /* next_batch may be NULL when the caller does not need it. */
  CHECK_INT(mx_replay_get(rb, KEY, S("P"), 11.0, &got, NULL), 0);
  mx_chunk_unref(got);
  CHECK_INT(mx_replay_get(rb, KEY, S("Q"), 11.0, &got, &nb),
            MX_ERR_NOTFOUND);
  CHECK(got == NULL);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.hits, 2);
  CHECK_INT(st.misses, 1);
  /* Honest accounting: at least the chunk, the key, since and token. */
  CHECK(st.bytes >= sizeof(mx_chunk) + ev->len + 12 + 1 + 1);
  mx_replay_free(rb);
  CHECK_INT(ev->refs, 1); /* freeing dropped the buffer's reference */
  mx_chunk_unref(ev);
  mx_buf_free(&nb);
}

static void test_keys_isolated(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_chunk *a = event_of("a"), *b = event_of("b"), *c = event_of("c");
  CHECK_INT(mx_replay_put(rb, S("tokenA"), S("P"), S("Q1"), a, 0), 0);
  CHECK_INT(mx_replay_put(rb, S("tokenB"), S("P"), S("Q2"), b, 0), 0);
  /* (key "ab", since "c") and (key "a", since "bc") are different. */
  CHECK_INT(mx_replay_put(rb, S("ab"), S("c"), S("x"), c, 0), 0);
  mx_chunk *got;
  mx_buf nb;
  mx_buf_init(&nb, 64);
  CHECK_INT(mx_replay_get(rb, S("tokenA"), S("P"), 0, &got, &nb), 0);
  CHECK(got == a);
  CHECK_MEMEQ(nb.data, nb.len, "Q1", 2);
  mx_chunk_unref(got);
  CHECK_INT(mx_replay_get(rb, S("tokenB"), S("P"), 0, &got, &nb), 0);
  CHECK(got == b);
  mx_chunk_unref(got);
  CHECK_INT(mx_replay_get(rb, S("a"), S("bc"), 0, &got, &nb),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_replay_get(rb, S("tokenC"), S("P"), 0, &got, &nb),
            MX_ERR_NOTFOUND);
  /* Empty key and empty since are ordinary values. */
  CHECK_INT(mx_replay_put(rb, "", 0, "", 0, S("first"), c, 0), 0);
  CHECK_INT(mx_replay_get(rb, "", 0, "", 0, 0, &got, &nb), 0);
  CHECK_MEMEQ(nb.data, nb.len, "first", 5);
  mx_chunk_unref(got);
  mx_replay_free(rb);
  CHECK(a->refs == 1 && b->refs == 1 && c->refs == 1);
  mx_chunk_unref(a);
  mx_chunk_unref(b);
  mx_chunk_unref(c);
  mx_buf_free(&nb);
}

static void test_replace_same_since(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_chunk *old = event_of("old"), *fresh = event_of("fresh");
  CHECK_INT(mx_replay_put(rb, KEY, S("P"), S("Q1"), old, 0), 0);
  CHECK_INT(mx_replay_put(rb, KEY, S("P"), S("Q2"), fresh, 1), 0);
  CHECK_INT(old->refs, 1); /* released on replacement */
  mx_chunk *got;
  mx_buf nb;
  mx_buf_init(&nb, 64);
  CHECK_INT(mx_replay_get(rb, KEY, S("P"), 1, &got, &nb), 0);
  CHECK(got == fresh);
  CHECK_MEMEQ(nb.data, nb.len, "Q2", 2);
  mx_chunk_unref(got);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.evictions, 0);
  mx_replay_free(rb);
  mx_chunk_unref(old);
  mx_chunk_unref(fresh);
  mx_buf_free(&nb);
}

/* The caller's resume loop: follow next_batch until a miss. */
static int resume(mx_replay *rb, const char *key, size_t klen,
                  const char *from, double now, char *seen, size_t cap,
                  mx_buf *at) {
  int n = 0;
  seen[0] = '\0';
  mx_buf_reset(at);
  mx_buf_append(at, from, strlen(from));
  for (;;) {
    mx_chunk *ev;
    char since[64];
    snprintf(since, sizeof(since), "%s", at->data);
    if (mx_replay_get(rb, key, klen, since, strlen(since), now, &ev, at))
      break;
    strncat(seen, ev->data, cap - strlen(seen) - 1);
    mx_chunk_unref(ev);
    n++;
  }
  return n;
}

static void test_chain(void) {
  mx_replay *rb = mx_replay_new(NULL);
  const char *tokens[] = {"P", "Q", "R", "S"};
  for (int i = 0; i < 3; i++) {
    char text[8];
    snprintf(text, sizeof(text), "%s>", tokens[i + 1]);
    mx_chunk *ev = event_of(text);
    CHECK_INT(mx_replay_put(rb, KEY, tokens[i], 1, tokens[i + 1], 1, ev, i),
              0);
    mx_chunk_unref(ev);
  }
  char seen[64];
  mx_buf at;
  mx_buf_init(&at, 64);
  /* A client that missed everything since P gets Q, R and S from memory,
   * then resumes upstream at S. */
  CHECK_INT(resume(rb, KEY, "P", 5, seen, sizeof(seen), &at), 3);
  CHECK_STREQ(seen, "Q>R>S>");
  CHECK_STREQ(at.data, "S");
  /* Lookups do not consume: a second tab can do the same. */
  CHECK_INT(resume(rb, KEY, "Q", 5, seen, sizeof(seen), &at), 2);
  CHECK_STREQ(seen, "R>S>");
  /* Once the client resumed past P, the caller may drop P's batch. */
  CHECK_INT(mx_replay_del(rb, KEY, S("P")), 0);
  CHECK_INT(mx_replay_del(rb, KEY, S("P")), MX_ERR_NOTFOUND);
  CHECK_INT(resume(rb, KEY, "P", 5, seen, sizeof(seen), &at), 0);
  CHECK_INT(resume(rb, KEY, "Q", 5, seen, sizeof(seen), &at), 2);
  mx_replay_free(rb);
  mx_buf_free(&at);
}

static void test_evict_by_bytes(void) {
  /* Measure one entry's cost, then allow room for three. */
  mx_replay *probe = mx_replay_new(NULL);
  mx_replay_stats st0, st1;
  mx_replay_get_stats(probe, &st0);
  mx_chunk *ev = mx_chunk_alloc(1000);
  memset(ev->data, 'e', 1000);
  CHECK_INT(mx_replay_put(probe, KEY, S("s0"), S("s1"), ev, 0), 0);
  mx_replay_get_stats(probe, &st1);
  size_t per = st1.bytes - st0.bytes;
  CHECK(per > 1000 && per < 1400);
  mx_replay_free(probe);

  mx_replay_opts o = {.max_bytes = st0.bytes + 3 * per, .max_age = 100};
  mx_replay *rb = mx_replay_new(&o);
  for (int i = 0; i < 5; i++) {
    char since[8], next[8];
    snprintf(since, sizeof(since), "s%d", i);
    snprintf(next, sizeof(next), "s%d", i + 1);
    CHECK_INT(mx_replay_put(rb, KEY, since, 2, next, 2, ev, i), 0);
  }
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 3);
  CHECK_INT(st.evictions, 2);
  CHECK(st.bytes <= o.max_bytes);
  CHECK_INT(ev->refs, 4); /* ours + three entries */
  /* Oldest first: the chain keeps its newest links s2 -> s5. */
  char seen[32];
  mx_buf at;
  mx_buf_init(&at, 64);
  mx_chunk *got;
  CHECK_INT(mx_replay_get(rb, KEY, S("s0"), 5, &got, &at), MX_ERR_NOTFOUND);
  CHECK_INT(mx_replay_get(rb, KEY, S("s1"), 5, &got, &at), MX_ERR_NOTFOUND);
  CHECK_INT(resume(rb, KEY, "s2", 5, seen, sizeof(seen), &at), 3);
  CHECK_STREQ(at.data, "s5");
  /* An entry larger than the whole budget is refused and removes the
   * stale batch at the same position. */
  mx_chunk *huge = mx_chunk_alloc(o.max_bytes);
  CHECK_INT(mx_replay_put(rb, KEY, S("s3"), S("x"), huge, 6), MX_ERR_LIMIT);
  CHECK_INT(huge->refs, 1);
  CHECK_INT(mx_replay_get(rb, KEY, S("s3"), 6, &got, &at), MX_ERR_NOTFOUND);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 2);
  mx_chunk_unref(huge);
  mx_replay_free(rb);
  CHECK_INT(ev->refs, 1);
  mx_chunk_unref(ev);
  mx_buf_free(&at);
}

static void test_evict_by_age(void) {
  mx_replay_opts o = {.max_bytes = 0, .max_age = 60};
  mx_replay *rb = mx_replay_new(&o);
  mx_chunk *ev = event_of("x");
  CHECK_INT(mx_replay_put(rb, KEY, S("a"), S("b"), ev, 100), 0);
  CHECK_INT(mx_replay_put(rb, KEY, S("b"), S("c"), ev, 130), 0);
  CHECK_INT(mx_replay_put(rb, KEY, S("c"), S("d"), ev, 150), 0);
  mx_chunk *got;
  /* Exactly max_age old is still served; older is not, even before a
   * sweep has run. */
  CHECK_INT(mx_replay_get(rb, KEY, S("a"), 160, &got, NULL), 0);
  mx_chunk_unref(got);
  CHECK_INT(mx_replay_get(rb, KEY, S("a"), 160.5, &got, NULL),
            MX_ERR_NOTFOUND);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.expirations, 1);
  CHECK_INT(st.entries, 2);
  /* The sweep drops what is too old and reports the count. */
  CHECK_INT(mx_replay_expire(rb, 200), 1);
  CHECK_INT(mx_replay_expire(rb, 200), 0);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.expirations, 2);
  /* A put sweeps too. */
  CHECK_INT(mx_replay_put(rb, KEY, S("d"), S("e"), ev, 1000), 0);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(ev->refs, 2);
  mx_replay_free(rb);
  mx_chunk_unref(ev);
}

static void test_next_batch_too_long(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_chunk *ev = event_of("x");
  CHECK_INT(mx_replay_put(rb, KEY, S("P"), S("a-rather-long-token"), ev, 0),
            0);
  mx_buf small;
  mx_buf_init(&small, 4);
  mx_chunk *got = (mx_chunk *)1;
  CHECK_INT(mx_replay_get(rb, KEY, S("P"), 0, &got, &small), MX_ERR_LIMIT);
  CHECK(got == NULL);
  CHECK_INT(ev->refs, 2); /* no reference handed out */
  mx_replay_free(rb);
  mx_chunk_unref(ev);
  mx_buf_free(&small);
}

static void test_many_entries(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_replay_stats st0, st;
  mx_replay_get_stats(rb, &st0);
  mx_chunk *ev = event_of("payload");
  char key[32], since[32];
  for (int i = 0; i < 20000; i++) {
    snprintf(key, sizeof(key), "k%d", i % 97);
    snprintf(since, sizeof(since), "s%d", i);
    CHECK_INT(mx_replay_put(rb, key, strlen(key), since, strlen(since), since,
                            strlen(since), ev, 0),
              0);
  }
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 20000);
  CHECK_INT(ev->refs, 20001);
  int found = 0;
  mx_buf nb;
  mx_buf_init(&nb, 64);
  for (int i = 0; i < 20000; i++) {
    snprintf(key, sizeof(key), "k%d", i % 97);
    snprintf(since, sizeof(since), "s%d", i);
    mx_chunk *got;
    if (mx_replay_get(rb, key, strlen(key), since, strlen(since), 0, &got,
                      &nb) == 0 &&
        strcmp(nb.data, since) == 0) {
      found++;
      mx_chunk_unref(got);
    }
  }
  CHECK_INT(found, 20000);
  for (int i = 0; i < 20000; i++) {
    snprintf(key, sizeof(key), "k%d", i % 97);
    snprintf(since, sizeof(since), "s%d", i);
    CHECK_INT(mx_replay_del(rb, key, strlen(key), since, strlen(since)), 0);
  }
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 0);
  CHECK_INT(ev->refs, 1);
  /* Only the grown table remains accounted. */
  CHECK(st.bytes >= st0.bytes && st.bytes < st0.bytes + 20000 * 8 * 3);
  mx_replay_free(rb);
  mx_chunk_unref(ev);
  mx_buf_free(&nb);
}

/* A store that records calls: the dispatch layer must pass everything
 * through and hand the store back to ops->free. */
typedef struct fake {
  int puts, gets, dels, expires, stats, frees;
  double last_now;
} fake;
static fake fk;

static int f_put(void *s, const char *k, size_t kl, const char *si,
                 size_t sl, const char *n, size_t nl, mx_chunk *e,
                 double now) {
  fk.puts++;
  fk.last_now = now;
  return s == &fk && kl == 1 && sl == 1 && nl == 1 && e ? 0 : -99;
}
static int f_get(void *s, const char *k, size_t kl, const char *si,
                 size_t sl, double now, mx_chunk **e, mx_buf *nb) {
  fk.gets++;
  *e = NULL;
  return MX_ERR_NOTFOUND;
}
static int f_del(void *s, const char *k, size_t kl, const char *si,
                 size_t sl) {
  fk.dels++;
  return 0;
}
static size_t f_expire(void *s, double now) {
  fk.expires++;
  return 7;
}
static void f_stats(void *s, mx_replay_stats *out) {
  fk.stats++;
  memset(out, 0, sizeof(*out));
  out->entries = 5;
}
static void f_free(void *s) { ((fake *)s)->frees++; }

static const mx_replay_store_ops fake_ops = {f_put, f_get, f_del, f_expire,
                                             f_stats, f_free};

static void test_custom_store(void) {
  mx_replay *rb = mx_replay_new_store(&fake_ops, &fk);
  mx_chunk *ev = event_of("x");
  CHECK_INT(mx_replay_put(rb, "k", 1, "s", 1, "n", 1, ev, 4.5), 0);
  CHECK(fk.last_now == 4.5);
  mx_chunk *got;
  CHECK_INT(mx_replay_get(rb, "k", 1, "s", 1, 5, &got, NULL), MX_ERR_NOTFOUND);
  CHECK_INT(mx_replay_del(rb, "k", 1, "s", 1), 0);
  CHECK_INT(mx_replay_expire(rb, 9), 7);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 5);
  mx_replay_free(rb);
  CHECK(fk.puts == 1 && fk.gets == 1 && fk.dels == 1 && fk.expires == 1 &&
        fk.stats == 1 && fk.frees == 1);
  /* A NULL store (its constructor failed) gives NULL. */
  CHECK(mx_replay_new_store(&fake_ops, NULL) == NULL);
  mx_chunk_unref(ev);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_put_get), TAP_CASE(test_keys_isolated),
          TAP_CASE(test_replace_same_since), TAP_CASE(test_chain),
          TAP_CASE(test_evict_by_bytes), TAP_CASE(test_evict_by_age),
          TAP_CASE(test_next_batch_too_long), TAP_CASE(test_many_entries),
          TAP_CASE(test_custom_store));
}
