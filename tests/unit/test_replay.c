#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "sync/batch.h"
#include "sync/replay.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)
#define KEY S("stream-key-A")

static mx_batch *batch_of(const char *next, const char *body) {
  return mx_batch_new(next, strlen(next), body, strlen(body));
}

/* The memory store answers from inside the call: these helpers check it
 * answered exactly once and return its answer (a new reference in *out,
 * which may be NULL when the caller does not need it). */
typedef struct answer {
  int calls, rv;
  mx_batch *batch;
} answer;

static void on_answer(void *ud, int rv, mx_batch *b) {
  answer *a = ud;
  a->calls++;
  a->rv = rv;
  a->batch = b ? mx_batch_ref(b) : NULL;
}

static int finish(answer *a, mx_batch **out) {
  CHECK_INT(a->calls, 1);
  if (out)
    *out = a->batch;
  else
    mx_batch_unref(a->batch);
  return a->rv;
}

static int put(mx_replay *rb, const char *key, size_t klen, const char *since,
               size_t slen, mx_batch *b, double now, mx_batch **stands) {
  answer a = {0};
  mx_replay_put_if_absent(rb, key, klen, since, slen, b, now, on_answer, &a);
  return finish(&a, stands);
}

static int get(mx_replay *rb, const char *key, size_t klen, const char *since,
               size_t slen, double now, mx_batch **out) {
  answer a = {0};
  mx_replay_get(rb, key, klen, since, slen, now, on_answer, &a);
  return finish(&a, out);
}

static void test_put_get(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_batch *b = batch_of("Q", "{}");
  mx_batch *stands = NULL;
  CHECK_INT(put(rb, KEY, S("P"), b, 10.0, &stands), 0);
  CHECK(stands == b);
  mx_batch_unref(stands);
  CHECK_INT(b->refs, 2); /* the store's own reference */
  mx_batch *got = NULL;
  CHECK_INT(get(rb, KEY, S("P"), 11.0, &got), 0);
  CHECK(got == b);
  CHECK_INT(b->refs, 3);
  CHECK_MEMEQ(got->next_batch, got->nlen, "Q", 1);
  mx_batch_unref(got);
  CHECK_INT(get(rb, KEY, S("Q"), 11.0, &got), MX_ERR_NOTFOUND);
  CHECK(got == NULL);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.hits, 1);
  CHECK_INT(st.misses, 1);
  /* Honest accounting: at least the batch, the key and since. */
  CHECK(st.bytes >= mx_batch_size(b) + 12 + 1);
  mx_replay_free(rb);
  CHECK_INT(b->refs, 1); /* freeing dropped the store's reference */
  mx_batch_unref(b);
}

static void test_keys_isolated(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_batch *a = batch_of("Q1", "a"), *b = batch_of("Q2", "b"),
           *c = batch_of("x", "c");
  CHECK_INT(put(rb, S("tokenA"), S("P"), a, 0, NULL), 0);
  CHECK_INT(put(rb, S("tokenB"), S("P"), b, 0, NULL), 0);
  /* (key "ab", since "c") and (key "a", since "bc") are different. */
  CHECK_INT(put(rb, S("ab"), S("c"), c, 0, NULL), 0);
  mx_batch *got;
  CHECK_INT(get(rb, S("tokenA"), S("P"), 0, &got), 0);
  CHECK(got == a);
  mx_batch_unref(got);
  CHECK_INT(get(rb, S("tokenB"), S("P"), 0, &got), 0);
  CHECK(got == b);
  mx_batch_unref(got);
  CHECK_INT(get(rb, S("a"), S("bc"), 0, NULL), MX_ERR_NOTFOUND);
  CHECK_INT(get(rb, S("tokenC"), S("P"), 0, NULL), MX_ERR_NOTFOUND);
  /* Empty key and empty since are ordinary values. */
  CHECK_INT(put(rb, "", 0, "", 0, c, 0, NULL), 0);
  CHECK_INT(get(rb, "", 0, "", 0, 0, &got), 0);
  CHECK(got == c);
  mx_batch_unref(got);
  mx_replay_free(rb);
  CHECK(a->refs == 1 && b->refs == 1 && c->refs == 1);
  mx_batch_unref(a);
  mx_batch_unref(b);
  mx_batch_unref(c);
}

/* Two answers from one position: the first stored wins, and the put of
 * the second answers with the first (which is what its streams get). */
static void test_first_answer_wins(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_batch *first = batch_of("Q1", "first"), *later = batch_of("Q2", "later");
  CHECK_INT(put(rb, KEY, S("P"), first, 0, NULL), 0);
  mx_batch *stands = NULL;
  CHECK_INT(put(rb, KEY, S("P"), later, 1, &stands), 0);
  CHECK(stands == first);
  mx_batch_unref(stands);
  CHECK_INT(later->refs, 1); /* not kept */
  mx_batch *got;
  CHECK_INT(get(rb, KEY, S("P"), 1, &got), 0);
  CHECK(got == first);
  mx_batch_unref(got);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.evictions, 0);
  mx_replay_free(rb);
  mx_batch_unref(first);
  mx_batch_unref(later);
}

/* The caller's resume loop: follow next_batch until a miss. */
static int resume(mx_replay *rb, const char *key, size_t klen,
                  const char *from, double now, char *seen, size_t cap,
                  char *at, size_t atcap) {
  int n = 0;
  seen[0] = '\0';
  snprintf(at, atcap, "%s", from);
  for (;;) {
    mx_batch *b;
    if (get(rb, key, klen, at, strlen(at), now, &b))
      break;
    strncat(seen, b->body, cap - strlen(seen) - 1);
    snprintf(at, atcap, "%s", b->next_batch);
    mx_batch_unref(b);
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
    mx_batch *b = batch_of(tokens[i + 1], text);
    CHECK_INT(put(rb, KEY, tokens[i], 1, b, i, NULL), 0);
    mx_batch_unref(b);
  }
  char seen[64], at[64];
  /* A client that missed everything since P gets Q, R and S from memory,
   * then resumes upstream at S. */
  CHECK_INT(resume(rb, KEY, "P", 5, seen, sizeof(seen), at, sizeof(at)), 3);
  CHECK_STREQ(seen, "Q>R>S>");
  CHECK_STREQ(at, "S");
  /* Lookups do not consume: a second tab can do the same. */
  CHECK_INT(resume(rb, KEY, "Q", 5, seen, sizeof(seen), at, sizeof(at)), 2);
  CHECK_STREQ(seen, "R>S>");
  mx_replay_free(rb);
}

static void test_evict_by_bytes(void) {
  /* Measure one entry's cost, then allow room for three. */
  mx_replay *probe = mx_replay_new(NULL);
  mx_replay_stats st0, st1;
  mx_replay_get_stats(probe, &st0);
  char body[1001];
  memset(body, 'e', 1000);
  body[1000] = '\0';
  mx_batch *b0 = batch_of("s1", body);
  CHECK_INT(put(probe, KEY, S("s0"), b0, 0, NULL), 0);
  mx_replay_get_stats(probe, &st1);
  size_t per = st1.bytes - st0.bytes;
  CHECK(per > 1000 && per < 1400);
  mx_replay_free(probe);
  mx_batch_unref(b0);

  mx_replay_opts o = {.max_bytes = st0.bytes + 3 * per, .max_age = 100};
  mx_replay *rb = mx_replay_new(&o);
  for (int i = 0; i < 5; i++) {
    char since[8], next[8];
    snprintf(since, sizeof(since), "s%d", i);
    snprintf(next, sizeof(next), "s%d", i + 1);
    mx_batch *b = batch_of(next, body);
    CHECK_INT(put(rb, KEY, since, 2, b, i, NULL), 0);
    mx_batch_unref(b);
  }
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 3);
  CHECK_INT(st.evictions, 2);
  CHECK(st.bytes <= o.max_bytes);
  /* Oldest first: the chain keeps its newest links s2 -> s5. */
  char seen[4096], at[64];
  CHECK_INT(get(rb, KEY, S("s0"), 5, NULL), MX_ERR_NOTFOUND);
  CHECK_INT(get(rb, KEY, S("s1"), 5, NULL), MX_ERR_NOTFOUND);
  CHECK_INT(resume(rb, KEY, "s2", 5, seen, sizeof(seen), at, sizeof(at)), 3);
  CHECK_STREQ(at, "s5");
  /* A batch larger than the whole budget is refused, nothing stored. */
  char *hbody = malloc(o.max_bytes + 1);
  memset(hbody, 'h', o.max_bytes);
  hbody[o.max_bytes] = '\0';
  mx_batch *huge = batch_of("x", hbody);
  free(hbody);
  mx_batch *stands = (mx_batch *)1;
  CHECK_INT(put(rb, KEY, S("s9"), huge, 6, &stands), MX_ERR_LIMIT);
  CHECK(stands == NULL);
  CHECK_INT(huge->refs, 1);
  CHECK_INT(get(rb, KEY, S("s9"), 6, NULL), MX_ERR_NOTFOUND);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 3);
  mx_batch_unref(huge);
  mx_replay_free(rb);
}

static void test_evict_by_age(void) {
  mx_replay_opts o = {.max_bytes = 0, .max_age = 60};
  mx_replay *rb = mx_replay_new(&o);
  mx_batch *b = batch_of("x", "x");
  CHECK_INT(put(rb, KEY, S("a"), b, 100, NULL), 0);
  CHECK_INT(put(rb, KEY, S("b"), b, 130, NULL), 0);
  CHECK_INT(put(rb, KEY, S("c"), b, 150, NULL), 0);
  /* Exactly max_age old is still served; older is not, even before a
   * sweep has run. */
  CHECK_INT(get(rb, KEY, S("a"), 160, NULL), 0);
  CHECK_INT(get(rb, KEY, S("a"), 160.5, NULL), MX_ERR_NOTFOUND);
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
  /* A put sweeps too; an expired entry does not stand in a put's way. */
  CHECK_INT(put(rb, KEY, S("d"), b, 1000, NULL), 0);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(b->refs, 2);
  mx_replay_free(rb);
  mx_batch_unref(b);
}

static void test_many_entries(void) {
  mx_replay *rb = mx_replay_new(NULL);
  mx_replay_stats st;
  mx_batch *b = batch_of("n", "payload");
  char key[32], since[32];
  for (int i = 0; i < 20000; i++) {
    snprintf(key, sizeof(key), "k%d", i % 97);
    snprintf(since, sizeof(since), "s%d", i);
    CHECK_INT(put(rb, key, strlen(key), since, strlen(since), b, 0, NULL), 0);
  }
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 20000);
  CHECK_INT(b->refs, 20001);
  int found = 0;
  for (int i = 0; i < 20000; i++) {
    snprintf(key, sizeof(key), "k%d", i % 97);
    snprintf(since, sizeof(since), "s%d", i);
    found += get(rb, key, strlen(key), since, strlen(since), 0, NULL) == 0;
  }
  CHECK_INT(found, 20000);
  CHECK_INT(mx_replay_expire(rb, 1e9), 20000);
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 0);
  CHECK_INT(b->refs, 1);
  mx_replay_free(rb);
  mx_batch_unref(b);
}

/* A store that records calls: the dispatch layer must pass everything
 * through and hand the store back to ops->free. */
typedef struct fake {
  int puts, gets, expires, stats, frees;
  double last_now;
} fake;
static fake fk;

static void f_put(void *s, const char *k, size_t kl, const char *si,
                  size_t sl, mx_batch *b, double now, mx_replay_done_fn done,
                  void *ud) {
  fk.puts++;
  fk.last_now = now;
  done(ud, s == &fk && kl == 1 && sl == 1 && b ? 0 : -99, b);
}
static void f_get(void *s, const char *k, size_t kl, const char *si,
                  size_t sl, double now, mx_replay_done_fn done, void *ud) {
  fk.gets++;
  done(ud, MX_ERR_UNAVAILABLE, NULL);
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

static const mx_replay_store_ops fake_ops = {f_get, f_put, f_expire, f_stats,
                                             f_free};

static void test_custom_store(void) {
  mx_replay *rb = mx_replay_new_store(&fake_ops, &fk);
  mx_batch *b = batch_of("n", "x");
  CHECK_INT(put(rb, "k", 1, "s", 1, b, 4.5, NULL), 0);
  CHECK(fk.last_now == 4.5);
  CHECK_INT(get(rb, "k", 1, "s", 1, 5, NULL), MX_ERR_UNAVAILABLE);
  CHECK_INT(mx_replay_expire(rb, 9), 7);
  mx_replay_stats st;
  mx_replay_get_stats(rb, &st);
  CHECK_INT(st.entries, 5);
  mx_replay_free(rb);
  CHECK(fk.puts == 1 && fk.gets == 1 && fk.expires == 1 && fk.stats == 1 &&
        fk.frees == 1);
  /* A NULL store (its constructor failed) gives NULL. */
  CHECK(mx_replay_new_store(&fake_ops, NULL) == NULL);
  mx_batch_unref(b);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_put_get), TAP_CASE(test_keys_isolated),
          TAP_CASE(test_first_answer_wins), TAP_CASE(test_chain),
          TAP_CASE(test_evict_by_bytes), TAP_CASE(test_evict_by_age),
          TAP_CASE(test_many_entries), TAP_CASE(test_custom_store));
}
