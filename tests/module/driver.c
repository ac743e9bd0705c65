/*
 * driver.c - a small C client of libpqhsm-pkcs11.so for the tests and the benchmark.
 *
 *   PQHSM_TEST_PIN=... driver check HYBRID_ID COMPOSITE_ID
 *       Reaches the module through C_GetInterface (3.0 list), signs with CKM_PQHSM_DUAL
 *       (with a CK_SIGN_ADDITIONAL_CONTEXT, single-part and a 600 KB multi-part message)
 *       and CKM_PQHSM_COMPOSITE, and prints "name hex" lines.  Run under valgrind.
 *   driver overhead SOCKET_PATH N
 *       Times N C_GetSessionInfo calls through the module and N raw round trips of the
 *       same request frame on a socket of its own, and prints both medians in ns.
 *   PQHSM_TEST_PIN=... driver mldsa LABEL SECONDS|- [THREADS]
 *       Signs a 64-byte message with CKM_ML_DSA (the ML-DSA key labelled LABEL) into a
 *       4627-byte buffer for SECONDS (C_SignInit + C_Sign, one round trip with extension
 *       v4, no size query) and prints the count and each latency in ns, one per line.
 *       With THREADS (default 1), that many threads sign at once, each on its own
 *       session.  SECONDS "-" signs in windows the caller paces: it prints "ready",
 *       then for each line "MS" on standard input signs for MS milliseconds and prints
 *       one line, the window's length in ns and then each latency in ns; it ends at
 *       the end of its input (bench_module interleaves windows of several setups).
 *   driver echo SOCKET_PATH
 *       A canned-reply server (answers C_Initialize, C_OpenSession, C_GetSessionInfo,
 *       C_CloseSession and C_Finalize at once, in C): run overhead against it to time
 *       the module's own client-side work without the Python server's noise.
 *
 * Linked against the module (the tests build it next to the module, with an rpath), using
 * the project's hand-written pkcs11.h.  The raw frames assume the server sends no
 * options in replies (DESIGN §8).
 */
#define _GNU_SOURCE
#include "pkcs11.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static CK_FUNCTION_LIST_3_0 *f;

static void die(const char *what, CK_RV rv)
{
    fprintf(stderr, "%s failed: 0x%lx\n", what, rv);
    exit(2);
}

#define CHECK(call)                       \
    do {                                  \
        CK_RV rv_ = (call);               \
        if (rv_ != CKR_OK)                \
            die(#call, rv_);              \
    } while (0)

static size_t unhex(const char *s, CK_BYTE *out, size_t max)
{
    size_t n = strlen(s) / 2;
    if (n > max)
        die("hex too long", 0);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            die("bad hex", 0);
        out[i] = (CK_BYTE)v;
    }
    return n;
}

static void print_hex(const char *name, const CK_BYTE *p, CK_ULONG n)
{
    printf("%s ", name);
    for (CK_ULONG i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\n");
}

static CK_OBJECT_HANDLE find(CK_SESSION_HANDLE s, CK_KEY_TYPE kt, const CK_BYTE *id, size_t idlen)
{
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_ID, (void *)id, idlen},
    };
    CK_OBJECT_HANDLE h[2];
    CK_ULONG n = 0;
    CHECK(f->C_FindObjectsInit(s, tpl, 3));
    CHECK(f->C_FindObjects(s, h, 2, &n));
    CHECK(f->C_FindObjectsFinal(s));
    if (n != 1)
        die("find: object count", n);
    return h[0];
}

/* Size query, then sign into a buffer of exactly that size. */
static void sign_one(CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key, const char *name,
                     const CK_BYTE *msg, CK_ULONG len, int multi)
{
    CHECK(f->C_SignInit(s, m, key));
    CK_ULONG n = 0;
    if (multi) {
        for (CK_ULONG at = 0; at < len; at += 100000)
            CHECK(f->C_SignUpdate(s, (CK_BYTE_PTR)msg + at, len - at > 100000 ? 100000 : len - at));
        CHECK(f->C_SignFinal(s, NULL, &n));
    } else {
        CHECK(f->C_Sign(s, (CK_BYTE_PTR)msg, len, NULL, &n));
    }
    CK_BYTE *sig = malloc(n);
    if (sig == NULL)
        die("malloc", 0);
    if (multi)
        CHECK(f->C_SignFinal(s, sig, &n));
    else
        CHECK(f->C_Sign(s, (CK_BYTE_PTR)msg, len, sig, &n));
    print_hex(name, sig, n);
    free(sig);
}

static int check(const char *pin, const char *hybrid_hex, const char *comp_hex)
{
    CK_INTERFACE *iface = NULL;
    CHECK(C_GetInterface((CK_UTF8CHAR_PTR) "PKCS 11", NULL, &iface, 0));
    f = iface->pFunctionList;
    if (f->version.major != 3)
        die("interface version", f->version.major);
    CHECK(f->C_Initialize(NULL));
    CK_SESSION_HANDLE s;
    CHECK(f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s));
    CHECK(f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    CK_BYTE id[64];
    size_t idlen = unhex(hybrid_hex, id, sizeof(id));
    CK_OBJECT_HANDLE dual = find(s, CKK_PQHSM_DUAL, id, idlen);
    idlen = unhex(comp_hex, id, sizeof(id));
    CK_OBJECT_HANDLE comp = find(s, CKK_PQHSM_COMPOSITE, id, idlen);

    static const CK_BYTE msg[] = "driver message";
    CK_BYTE ctx[] = "driver ctx";
    CK_SIGN_ADDITIONAL_CONTEXT p = {CKH_HEDGE_REQUIRED, ctx, sizeof(ctx) - 1};
    CK_MECHANISM with_ctx = {CKM_PQHSM_DUAL, &p, sizeof(p)};
    CK_MECHANISM plain = {CKM_PQHSM_DUAL, NULL, 0};
    sign_one(s, &with_ctx, dual, "dual_ctx", msg, sizeof(msg) - 1, 0);
    CK_ULONG big_len = 600000;
    CK_BYTE *big = malloc(big_len);
    if (big == NULL)
        die("malloc", 0);
    for (CK_ULONG i = 0; i < big_len; i++)
        big[i] = (CK_BYTE)(i % 251);
    sign_one(s, &plain, dual, "dual_big", big, big_len, 1);
    CK_MECHANISM comp_m = {CKM_PQHSM_COMPOSITE, &p, sizeof(p)};
    sign_one(s, &comp_m, comp, "comp_ctx", msg, sizeof(msg) - 1, 1);
    free(big);

    /* a wrong parameter length is refused locally */
    CK_MECHANISM bad = {CKM_PQHSM_COMPOSITE, &p, sizeof(p) - 1};
    printf("bad_param %lx\n", f->C_SignInit(s, &bad, comp));
    CHECK(f->C_Logout(s));
    CHECK(f->C_CloseSession(s));
    CHECK(f->C_Finalize(NULL));
    return 0;
}

/* ---------------------------------------------------------------- overhead -- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void put32(CK_BYTE *p, uint32_t v)
{
    p[0] = (CK_BYTE)(v >> 24);
    p[1] = (CK_BYTE)(v >> 16);
    p[2] = (CK_BYTE)(v >> 8);
    p[3] = (CK_BYTE)v;
}

static void put64(CK_BYTE *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

static int io_all(int fd, void *p, size_t n, int sending)
{
    CK_BYTE *b = p;
    while (n) {
        ssize_t k = sending ? send(fd, b, n, MSG_NOSIGNAL) : recv(fd, b, n, 0);
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One raw request (header, options, body sent as the module sends them) and its reply. */
static size_t raw_call(int fd, uint32_t code, const CK_BYTE *body, size_t blen, CK_BYTE *reply,
                       size_t cap)
{
    static const char opt[] = "libpqhsm-pkcs11.so";
    CK_BYTE frame[256], head[12];
    if (12 + sizeof(opt) - 1 + blen > sizeof(frame))
        die("raw frame", blen);
    put32(frame, code);
    put32(frame + 4, sizeof(opt) - 1);
    put32(frame + 8, (uint32_t)blen);
    memcpy(frame + 12, opt, sizeof(opt) - 1);
    memcpy(frame + 12 + sizeof(opt) - 1, body, blen);
    if (io_all(fd, frame, 12 + sizeof(opt) - 1 + blen, 1) || io_all(fd, head, 12, 0))
        die("raw io", 0);
    uint32_t olen = ((uint32_t)head[4] << 24) | ((uint32_t)head[5] << 16) | (head[6] << 8) | head[7];
    uint32_t rlen = ((uint32_t)head[8] << 24) | ((uint32_t)head[9] << 16) | (head[10] << 8) | head[11];
    if (olen != 0 || rlen > cap || io_all(fd, reply, rlen, 0))
        die("raw reply", rlen);
    return rlen;
}

static int overhead(const char *path, long n)
{
    uint64_t *t = malloc(sizeof(uint64_t) * (size_t)n);
    if (t == NULL)
        die("malloc", 0);
    CK_FUNCTION_LIST *fl;
    CHECK(C_GetFunctionList(&fl));
    CHECK(fl->C_Initialize(NULL));
    CK_SESSION_HANDLE s;
    CHECK(fl->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s));
    CK_SESSION_INFO info;
    for (long i = 0; i < n / 10 + 1; i++) /* warm up */
        CHECK(fl->C_GetSessionInfo(s, &info));
    for (long i = 0; i < n; i++) {
        uint64_t a = now_ns();
        CHECK(fl->C_GetSessionInfo(s, &info));
        t[i] = now_ns() - a;
    }
    qsort(t, (size_t)n, sizeof(*t), cmp_u64);
    printf("module_p50_ns %lu\nmodule_p99_ns %lu\n", (unsigned long)t[n / 2],
           (unsigned long)t[n * 99 / 100]);
    CHECK(fl->C_CloseSession(s));
    CHECK(fl->C_Finalize(NULL));

    /* The same frames on a raw socket: version byte, C_Initialize, C_OpenSession. */
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    CK_BYTE v = 0x50, reply[4096], body[128];
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) || io_all(fd, &v, 1, 1) ||
        io_all(fd, &v, 1, 0))
        die("raw connect", 0);
    static const char hs[] = "PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1";
    size_t k = 0;
    put32(body, 1);
    put32(body + 4, 5);
    memcpy(body + 8, "ayyay", 5);
    k = 13;
    body[k++] = 1;
    put32(body + k, sizeof(hs) - 1);
    k += 4;
    memcpy(body + k, hs, sizeof(hs) - 1);
    k += sizeof(hs) - 1;
    body[k++] = 0;
    body[k++] = 0;
    put32(body + k, 0);
    k += 4;
    raw_call(fd, 1, body, k, reply, sizeof(reply));
    put32(body, 10);
    put32(body + 4, 2);
    memcpy(body + 8, "uu", 2);
    put64(body + 10, 1);
    put64(body + 18, CKF_SERIAL_SESSION);
    size_t r = raw_call(fd, 2, body, 26, reply, sizeof(reply));
    if (r != 4 + 4 + 1 + 8)
        die("raw open session", r);
    CK_BYTE session[8];
    memcpy(session, reply + 9, 8); /* call id, signature "u", then the handle */
    put32(body, 13);
    put32(body + 4, 1);
    body[8] = 'u';
    memcpy(body + 9, session, 8);
    uint32_t code = 3;
    for (long i = 0; i < n / 10 + 1; i++)
        raw_call(fd, code++, body, 17, reply, sizeof(reply));
    for (long i = 0; i < n; i++) {
        uint64_t a = now_ns();
        raw_call(fd, code++, body, 17, reply, sizeof(reply));
        t[i] = now_ns() - a;
    }
    qsort(t, (size_t)n, sizeof(*t), cmp_u64);
    printf("raw_p50_ns %lu\nraw_p99_ns %lu\n", (unsigned long)t[n / 2],
           (unsigned long)t[n * 99 / 100]);
    close(fd);
    free(t);
    return 0;
}

typedef struct {
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE key;
    uint64_t end;
    size_t count, cap;
    uint64_t *t;
} signer;

/* One thread: sign a 64-byte message with CKM_ML_DSA on its own session until `end`. */
static void *sign_loop(void *arg)
{
    signer *g = arg;
    CK_BYTE msg[64], sig[4627];
    for (int i = 0; i < 64; i++)
        msg[i] = (CK_BYTE)i;
    CK_MECHANISM m = {CKM_ML_DSA, NULL, 0};
    g->count = 0;
    while (now_ns() < g->end && g->count < g->cap) {
        uint64_t a = now_ns();
        CK_ULONG len = sizeof(sig);
        CHECK(g->fl->C_SignInit(g->session, &m, g->key));
        CHECK(g->fl->C_Sign(g->session, msg, sizeof(msg), sig, &len));
        g->t[g->count++] = now_ns() - a;
    }
    return NULL;
}

/* All threads sign for `ns`; the window's real length in ns. */
static uint64_t sign_window(signer *g, int threads, uint64_t ns)
{
    pthread_t tid[64];
    uint64_t start = now_ns();
    for (int i = 0; i < threads; i++) {
        g[i].end = start + ns;
        if (pthread_create(&tid[i], NULL, sign_loop, &g[i]) != 0)
            die("pthread_create", 0);
    }
    for (int i = 0; i < threads; i++)
        pthread_join(tid[i], NULL);
    return now_ns() - start;
}

static int mldsa_rate(const char *pin, const char *label, const char *seconds, int threads)
{
    if (threads < 1 || threads > 64)
        die("thread count", (CK_RV)threads);
    CK_FUNCTION_LIST *fl;
    CHECK(C_GetFunctionList(&fl));
    CHECK(fl->C_Initialize(NULL));
    CK_SESSION_HANDLE s;
    CHECK(fl->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s));
    CHECK(fl->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE kt = CKK_ML_DSA;
    CK_ATTRIBUTE tpl[] = {{CKA_CLASS, &cls, sizeof(cls)},
                          {CKA_KEY_TYPE, &kt, sizeof(kt)},
                          {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE key;
    CK_ULONG n = 0;
    CHECK(fl->C_FindObjectsInit(s, tpl, 3));
    CHECK(fl->C_FindObjects(s, &key, 1, &n));
    CHECK(fl->C_FindObjectsFinal(s));
    if (n != 1)
        die("find", n);
    signer g[64];
    memset(g, 0, sizeof(g));
    for (int i = 0; i < threads; i++) {
        g[i].fl = fl;
        g[i].key = key;
        g[i].session = s;
        g[i].cap = 1 << 20;
        g[i].t = malloc(g[i].cap * sizeof(*g[i].t));
        if (g[i].t == NULL)
            die("malloc", 0);
        if (i > 0)
            CHECK(fl->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &g[i].session));
    }
    if (strcmp(seconds, "-") == 0) {
        printf("ready\n");
        fflush(stdout);
        char line[64];
        while (fgets(line, sizeof(line), stdin) != NULL) {
            uint64_t took = sign_window(g, threads, (uint64_t)(atof(line) * 1e6));
            printf("%lu", (unsigned long)took);
            for (int i = 0; i < threads; i++)
                for (size_t j = 0; j < g[i].count; j++)
                    printf(" %lu", (unsigned long)g[i].t[j]);
            printf("\n");
            fflush(stdout);
        }
    } else {
        sign_window(g, threads, (uint64_t)(atof(seconds) * 1e9));
        size_t total = 0;
        for (int i = 0; i < threads; i++)
            total += g[i].count;
        printf("%zu\n", total);
        for (int i = 0; i < threads; i++)
            for (size_t j = 0; j < g[i].count; j++)
                printf("%lu\n", (unsigned long)g[i].t[j]);
    }
    for (int i = 0; i < threads; i++)
        free(g[i].t);
    CHECK(fl->C_Finalize(NULL));
    return 0;
}

static void reply_frame(int fd, uint32_t code, uint32_t call, const char *sig, const CK_BYTE *fields,
                        size_t flen)
{
    CK_BYTE out[256];
    size_t slen = strlen(sig), blen = 8 + slen + flen;
    put32(out, code);
    put32(out + 4, 0);
    put32(out + 8, (uint32_t)blen);
    put32(out + 12, call);
    put32(out + 16, (uint32_t)slen);
    memcpy(out + 20, sig, slen);
    memcpy(out + 20 + slen, fields, flen);
    if (io_all(fd, out, 12 + blen, 1))
        die("echo send", 0);
}

__attribute__((noreturn)) static void echo(const char *path)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 8))
        die("echo listen", 0);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0)
            die("echo accept", 0);
        CK_BYTE v, head[12], buf[65536], fields[32];
        if (io_all(fd, &v, 1, 0) || io_all(fd, &v, 1, 1)) {
            close(fd);
            continue;
        }
        while (io_all(fd, head, 12, 0) == 0) {
            uint32_t code = ((uint32_t)head[0] << 24) | ((uint32_t)head[1] << 16) |
                            (head[2] << 8) | head[3];
            uint32_t olen = ((uint32_t)head[4] << 24) | ((uint32_t)head[5] << 16) |
                            (head[6] << 8) | head[7];
            uint32_t blen = ((uint32_t)head[8] << 24) | ((uint32_t)head[9] << 16) |
                            (head[10] << 8) | head[11];
            if (olen + blen > sizeof(buf) || io_all(fd, buf, olen + blen, 0) || blen < 4)
                break;
            CK_BYTE *b = buf + olen;
            uint32_t call = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | (b[2] << 8) | b[3];
            if (call == 10) {
                put64(fields, 1);
                reply_frame(fd, code, call, "u", fields, 8);
            } else if (call == 13) {
                put64(fields, 1);
                put64(fields + 8, CKS_RO_PUBLIC_SESSION);
                put64(fields + 16, CKF_SERIAL_SESSION);
                put64(fields + 24, 0);
                reply_frame(fd, code, call, "uuuu", fields, 32);
            } else {
                reply_frame(fd, code, call, "", fields, 0);
            }
        }
        close(fd);
    }
}

/* The user PIN comes from $PQHSM_TEST_PIN, never from argv, which ps shows to everyone. */
static const char *test_pin(void)
{
    const char *pin = getenv("PQHSM_TEST_PIN");
    if (pin == NULL) {
        fprintf(stderr, "driver: set PQHSM_TEST_PIN to the user PIN\n");
        exit(2);
    }
    return pin;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "echo") == 0)
        echo(argv[2]);
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "mldsa") == 0)
        return mldsa_rate(test_pin(), argv[2], argv[3], argc == 5 ? atoi(argv[4]) : 1);
    if (argc == 4 && strcmp(argv[1], "check") == 0)
        return check(test_pin(), argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "overhead") == 0)
        return overhead(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: PQHSM_TEST_PIN=... driver check HYBRID_ID COMPOSITE_ID\n"
                    "       PQHSM_TEST_PIN=... driver mldsa LABEL SECONDS|- [THREADS]\n"
                    "       driver overhead SOCKET_PATH N\n"
                    "       driver echo SOCKET_PATH\n");
    return 2;
}
