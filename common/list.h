/*
 * mx_list: an intrusive, circular doubly-linked list (the shape of the
 * Linux kernel's and h2o's). A struct that can be in a list embeds an
 * mx_list_node per list; the list itself is a sentinel node. Insertion
 * and removal are O(1), and a node knows whether it is linked, so an
 * object can leave a queue without a walk.
 *
 *   mx_list_init(&q);                 empty list
 *   mx_list_push_back(&q, &obj->node);
 *   mx_list_remove(&obj->node);       safe on an unlinked node
 *   MX_LIST_FOREACH_SAFE(n, next, &q) { T *o = MX_CONTAINER_OF(n, T, node); }
 */
#ifndef MX_LIST_H
#define MX_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct mx_list_node {
  struct mx_list_node *prev, *next; /* both NULL: not linked */
} mx_list_node;

typedef mx_list_node mx_list; /* the sentinel */

#define MX_CONTAINER_OF(ptr, type, member)                                    \
  ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void mx_list_init(mx_list *l) { l->prev = l->next = l; }

static inline bool mx_list_empty(const mx_list *l) { return l->next == l; }

static inline bool mx_list_linked(const mx_list_node *n) {
  return n->next != NULL;
}

static inline void mx_list_insert_after(mx_list_node *at, mx_list_node *n) {
  n->prev = at;
  n->next = at->next;
  at->next->prev = n;
  at->next = n;
}

static inline void mx_list_push_back(mx_list *l, mx_list_node *n) {
  mx_list_insert_after(l->prev, n);
}

static inline void mx_list_push_front(mx_list *l, mx_list_node *n) {
  mx_list_insert_after(l, n);
}

/* Unlinks n (nothing when it is not linked). */
static inline void mx_list_remove(mx_list_node *n) {
  if (!n->next)
    return;
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = NULL;
}

/* The first node, or NULL when empty. */
static inline mx_list_node *mx_list_first(const mx_list *l) {
  return l->next == l ? NULL : l->next;
}

static inline mx_list_node *mx_list_pop_front(mx_list *l) {
  mx_list_node *n = mx_list_first(l);
  if (n)
    mx_list_remove(n);
  return n;
}

/* Moves every node of src to the end of dst; src is left empty. */
static inline void mx_list_move_all(mx_list *dst, mx_list *src) {
  if (mx_list_empty(src))
    return;
  src->next->prev = dst->prev;
  dst->prev->next = src->next;
  src->prev->next = dst;
  dst->prev = src->prev;
  mx_list_init(src);
}

/* Iterates; the body may unlink (or free) n, but not next. */
#define MX_LIST_FOREACH_SAFE(n, nx, list)                                     \
  for (mx_list_node *n = (list)->next, *nx = n->next; n != (list);            \
       n = nx, nx = n->next)

#endif
