/*
 * libpqhsm-pkcs11.so - the pqhsm appliance's own PKCS#11 module (issue 7).
 *
 * Forwards PKCS#11 calls over a Unix socket to the appliance's front end
 * (python -m pkcs11_shim serve), speaking the p11-kit 0.24 RPC protocol (offering the
 * pqhsm extension, version bytes 0x53 to 0x50, and accepting a plain version-0 answer),
 * exactly as p11-kit's client module encodes it (DESIGN §8).  One connection per
 * process.  With a server that speaks extension v3 the connection is multiplexed: each
 * thread sends its request and waits for the reply with its request's code, so the
 * threads of an application sign side by side; otherwise one request at a time.  With
 * v4, a C_SignInit that repeats the session's last successful one is sent together with
 * the C_Sign that follows it (one round trip per signature, see g_inits).
 *
 * Every reply field is bounds-checked; anything malformed, truncated or out of order
 * becomes CKR_DEVICE_ERROR and drops the connection, which the next call reopens.
 */
#define _GNU_SOURCE
#define CK_EXPORT __attribute__((visibility("default")))

#include "pkcs11.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_MESSAGE (1u << 20) /* body or options, either direction */
#define MAX_ARRAY 4096u        /* elements in any counted array */
#define MAX_DEPTH 2            /* nested attribute templates */
#define NULL_LEN 0xffffffffu
#define RANDOM_CHUNK 16384u
#define SIGN_CHUNK (256u * 1024u) /* C_SignUpdate data per request */
#define IO_TIMEOUT_SECONDS 30
#define EXTENSION_VERSION 0x50   /* pqhsm extension v1 (README.md) */
#define EXTENSION_VERSION_2 0x51 /* v2: C_SignInit replies the signature length */
#define EXTENSION_VERSION_3 0x52 /* v3: v2, multiplexed (replies matched by code) */
#define EXTENSION_VERSION_4 0x53 /* v4: v3, C_SignInit + C_Sign in one request */
#define MAX_SIGN_CONTEXT 255u
#define PARAM_MAX (12u + MAX_SIGN_CONTEXT)

static const char HANDSHAKE[] = "PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1";
static const char MODULE_NAME[] = "libpqhsm-pkcs11.so";

/* p11-kit call ids (rpc-message.h, protocol version 0). */
enum {
    CALL_ERROR = 0,
    CALL_SignOnce = 0x8001, /* extension v4: "uMuayfy" -> "ay", C_SignInit + C_Sign */
    CALL_Initialize = 1,
    CALL_Finalize = 2,
    CALL_GetInfo = 3,
    CALL_GetSlotList = 4,
    CALL_GetSlotInfo = 5,
    CALL_GetTokenInfo = 6,
    CALL_GetMechanismList = 7,
    CALL_GetMechanismInfo = 8,
    CALL_OpenSession = 10,
    CALL_CloseSession = 11,
    CALL_CloseAllSessions = 12,
    CALL_GetSessionInfo = 13,
    CALL_Login = 18,
    CALL_Logout = 19,
    CALL_DestroyObject = 22,
    CALL_GetAttributeValue = 24,
    CALL_FindObjectsInit = 26,
    CALL_FindObjects = 27,
    CALL_FindObjectsFinal = 28,
    CALL_DigestInit = 37,
    CALL_Digest = 38,
    CALL_DigestUpdate = 39,
    CALL_DigestFinal = 41,
    CALL_SignInit = 42,
    CALL_Sign = 43,
    CALL_SignUpdate = 44,
    CALL_SignFinal = 45,
    CALL_VerifyInit = 48,
    CALL_Verify = 49,
    CALL_VerifyUpdate = 50,
    CALL_VerifyFinal = 51,
    CALL_GenerateKeyPair = 59,
    CALL_GenerateRandom = 64,
};

/* ---------------------------------------------------------------- global state -- */

/*
 * g_lock guards every global below and every conn and waiter.  A thread holds it for
 * its whole PKCS#11 call, except on a multiplexed connection while it sends (under
 * g_send_lock, so frames never interleave) and while it waits for its reply.
 */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_send_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialized;
static pid_t g_pid;
static uint32_t g_code;

/* A request sent on a multiplexed connection, waiting for its reply (on its stack). */
typedef struct waiter {
    struct waiter *next;
    uint32_t code;
    int done;      /* the reply arrived (body set) or the connection broke (body NULL) */
    uint8_t *body; /* the reply's body (malloc'ed), options dropped */
    uint32_t blen;
    pthread_cond_t cond;
} waiter;

/*
 * One connection to the server.  g_conn holds a reference; so does each thread using
 * the socket outside g_lock.  A broken connection is shut down at once (which wakes its
 * reader) and closed when its last user lets go, so no thread ever uses a closed or
 * reused descriptor.  On a multiplexed connection one waiting thread at a time reads
 * (`reading`) and hands every reply to the waiter with its code.
 */
typedef struct conn {
    int fd;
    int refs;
    int broken;
    int mux;
    int reading;
    waiter *waiters;
} conn;

static conn *g_conn;
static unsigned g_generation; /* counts connections: state kept per connection checks it */
static int g_atfork_registered;
static int g_sized; /* the server speaks extension v2: C_SignInit replies the length */
static int g_once;  /* the server speaks extension v4: CALL_SignOnce */

/* What a C_SignInit asked for: the mechanism (parameter as encoded) and the key. */
typedef struct {
    uint32_t mech;
    uint32_t param_len; /* 0: no parameter */
    uint8_t param[PARAM_MAX];
    CK_OBJECT_HANDLE key;
} sign_init_t;

/*
 * Signing operations this module knows to be active, with the signature length the
 * server gave in its C_SignInit reply (extended connections only).  Size queries and
 * short buffers on such an operation are answered here, exactly as the server would
 * answer them (its answer is fixed when the operation starts), which saves one of the
 * three round trips most applications make per signature.  An operation leaves the
 * table when the server ends it: any C_Sign/C_SignFinal reply other than a short
 * buffer, a failing C_SignUpdate, C_CloseSession, C_CloseAllSessions, C_Logout, or a
 * new connection.  A full table only means queries go to the server.  Under g_lock.
 */
#define SIGN_OPS 64
static struct {
    CK_SESSION_HANDLE session;
    CK_ULONG length;
    int used;
    int deferred; /* v4: not sent yet; goes with the C_Sign (init says what it was) */
    sign_init_t init;
} g_sign_ops[SIGN_OPS];

/*
 * Extension v4: per session, the last C_SignInit the server accepted, and the length it
 * gave.  A C_SignInit that repeats it exactly, with no operation active, is not sent:
 * the module answers CKR_OK and keeps the operation as deferred; the C_Sign that ends it
 * travels with it (CALL_SignOnce), so a signer that signs again and again with one key
 * makes one round trip per signature instead of two.  Anything else on a deferred
 * operation (C_SignUpdate, C_SignFinal with a buffer) sends the C_SignInit first.  Why
 * the C_SignInit can be predicted: it failed last time for none of its own arguments,
 * and what could make it fail now goes through this module and clears the entry
 * (C_CloseSession, C_CloseAllSessions, C_Logout, C_DestroyObject, a new connection), or
 * is a change made by another application (its key destroyed or migrated past its
 * classical part): then the combined request fails, and C_Sign returns that error,
 * exactly as a C_Sign after a real C_SignInit would had the change come between them.
 * A failed combined request forgets the session's entry.  Under g_lock.
 */
static struct {
    CK_SESSION_HANDLE session;
    CK_ULONG length;
    int used;
    sign_init_t init;
} g_inits[SIGN_OPS];

static void sign_ops_clear(void)
{
    memset(g_sign_ops, 0, sizeof(g_sign_ops));
    memset(g_inits, 0, sizeof(g_inits));
}

static void inits_forget(CK_SESSION_HANDLE h)
{
    for (int i = 0; i < SIGN_OPS; i++)
        if (g_inits[i].used && g_inits[i].session == h)
            g_inits[i].used = 0;
}

static void inits_remember(CK_SESSION_HANDLE h, const sign_init_t *init, CK_ULONG length)
{
    int i = -1;
    for (int j = 0; j < SIGN_OPS && i < 0; j++)
        if (g_inits[j].used && g_inits[j].session == h)
            i = j;
    for (int j = 0; j < SIGN_OPS && i < 0; j++)
        if (!g_inits[j].used)
            i = j;
    if (i < 0)
        i = (int)(h % SIGN_OPS); /* full: replace one */
    g_inits[i].session = h;
    g_inits[i].length = length;
    g_inits[i].init = *init;
    g_inits[i].used = 1;
}

/* The slot of session h's remembered C_SignInit if it is exactly init, else -1. */
static int inits_match(CK_SESSION_HANDLE h, const sign_init_t *init)
{
    for (int i = 0; i < SIGN_OPS; i++) {
        const sign_init_t *k = &g_inits[i].init;
        if (g_inits[i].used && g_inits[i].session == h && k->mech == init->mech &&
            k->key == init->key && k->param_len == init->param_len &&
            memcmp(k->param, init->param, init->param_len) == 0)
            return i;
    }
    return -1;
}

static int sign_op_find(CK_SESSION_HANDLE h)
{
    for (int i = 0; i < SIGN_OPS; i++)
        if (g_sign_ops[i].used && g_sign_ops[i].session == h)
            return i;
    return -1;
}

static void sign_op_forget(CK_SESSION_HANDLE h)
{
    int i = sign_op_find(h);
    if (i >= 0)
        g_sign_ops[i].used = 0;
}

/* Remember an active operation (deferred: init says what to send); its slot, or -1. */
static int sign_op_remember(CK_SESSION_HANDLE h, CK_ULONG length, const sign_init_t *deferred)
{
    int i = sign_op_find(h);
    for (int j = 0; i < 0 && j < SIGN_OPS; j++)
        if (!g_sign_ops[j].used)
            i = j;
    if (i < 0)
        return -1;
    g_sign_ops[i].session = h;
    g_sign_ops[i].length = length;
    g_sign_ops[i].used = 1;
    g_sign_ops[i].deferred = deferred != NULL;
    if (deferred != NULL)
        g_sign_ops[i].init = *deferred;
    return i;
}

static void atfork_prepare(void)
{
    pthread_mutex_lock(&g_lock);
    pthread_mutex_lock(&g_send_lock);
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&g_send_lock);
    pthread_mutex_unlock(&g_lock);
}

static void atfork_child(void)
{
    pthread_mutex_unlock(&g_send_lock);
    pthread_mutex_unlock(&g_lock);
}

/* ------------------------------------------------------------- request builder -- */

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    int failed;  /* out of memory or over MAX_MESSAGE */
    int too_big; /* over MAX_MESSAGE */
    int secret;  /* holds a PIN: every copy is wiped before it is freed */
} wbuf;

/* Free a request's buffer; one that held a PIN is overwritten first. */
static void w_release(wbuf *w)
{
    if (w->secret && w->data != NULL)
        explicit_bzero(w->data, w->cap);
    free(w->data);
    w->data = NULL;
}

static void w_raw(wbuf *w, const void *p, size_t n)
{
    if (w->failed)
        return;
    if (n > MAX_MESSAGE || w->len + n > MAX_MESSAGE) {
        w->failed = w->too_big = 1;
        return;
    }
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + n)
            cap *= 2;
        /* a secret buffer grows by copy and wipe: realloc would free the old block as is */
        uint8_t *d = w->secret ? malloc(cap) : realloc(w->data, cap);
        if (d == NULL) {
            w->failed = 1;
            return;
        }
        if (w->secret && w->data != NULL) {
            memcpy(d, w->data, w->len);
            w_release(w);
        }
        w->data = d;
        w->cap = cap;
    }
    if (n)
        memcpy(w->data + w->len, p, n);
    w->len += n;
}

static void w_u8(wbuf *w, uint8_t v) { w_raw(w, &v, 1); }

static void w_u32(wbuf *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    w_raw(w, b, 4);
}

static void w_u64(wbuf *w, uint64_t v)
{
    w_u32(w, (uint32_t)(v >> 32));
    w_u32(w, (uint32_t)v);
}

/* u32 length + bytes; NULL as 0xffffffff */
static void w_bytes(wbuf *w, const void *p, size_t n)
{
    if (p == NULL) {
        w_u32(w, NULL_LEN);
        return;
    }
    if (n >= MAX_MESSAGE) {
        w->failed = w->too_big = 1;
        return;
    }
    w_u32(w, (uint32_t)n);
    w_raw(w, p, n);
}

/* "ay" input: valid byte + byte array, or (NULL) valid 0 + length */
static void w_ay(wbuf *w, const void *p, size_t n)
{
    if (p == NULL) {
        w_u8(w, 0);
        w_u32(w, n >= MAX_MESSAGE ? MAX_MESSAGE : (uint32_t)n);
        return;
    }
    w_u8(w, 1);
    w_bytes(w, p, n);
}

/* "fy"/"fu": output buffer size, 0 for a size query */
static void w_fbuf(wbuf *w, const void *buffer, CK_ULONG n)
{
    if (buffer == NULL)
        w_u32(w, 0);
    else
        w_u32(w, n >= MAX_MESSAGE ? MAX_MESSAGE : (uint32_t)n);
}

static void w_begin(wbuf *w, uint32_t call_id, const char *sig)
{
    memset(w, 0, sizeof(*w));
    w_u32(w, call_id);
    w_bytes(w, sig, strlen(sig));
}

/* -------------------------------------------------------------- reply reader -- */

typedef struct {
    uint8_t *data; /* owned */
    size_t len;
    size_t pos;
    int bad;
} rbuf;

static const uint8_t *r_take(rbuf *r, size_t n)
{
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *p = r->data + r->pos;
    r->pos += n;
    return p;
}

static uint8_t r_u8(rbuf *r)
{
    const uint8_t *p = r_take(r, 1);
    return p ? p[0] : 0;
}

static uint32_t r_u32(rbuf *r)
{
    const uint8_t *p = r_take(r, 4);
    if (p == NULL)
        return 0;
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t r_u64(rbuf *r)
{
    uint64_t hi = r_u32(r);
    return (hi << 32) | r_u32(r);
}

/* A CK_ULONG from the wire (u64; CK_ULONG is 64-bit on this platform). */
static CK_ULONG r_ulong(rbuf *r) { return (CK_ULONG)r_u64(r); }

static void r_version(rbuf *r, CK_VERSION *v)
{
    const uint8_t *p = r_take(r, 2);
    if (p) {
        v->major = p[0];
        v->minor = p[1];
    }
}

/* u32 length + bytes; *out NULL for a NULL array. */
static int r_bytes(rbuf *r, const uint8_t **out, uint32_t *n)
{
    *out = NULL;
    *n = r_u32(r);
    if (r->bad)
        return -1;
    if (*n == NULL_LEN) {
        *n = 0;
        return 0;
    }
    if (*n > MAX_MESSAGE) {
        r->bad = 1;
        return -1;
    }
    *out = r_take(r, *n);
    return r->bad ? -1 : 0;
}

/* "s": a fixed-width blank-padded string */
static void r_string(rbuf *r, CK_UTF8CHAR *dst, size_t width)
{
    const uint8_t *p;
    uint32_t n;
    if (r_bytes(r, &p, &n) < 0)
        return;
    memset(dst, ' ', width);
    if (p)
        memcpy(dst, p, n < width ? n : width);
}

static int r_done(rbuf *r) { return !r->bad && r->pos == r->len; }

/* ----------------------------------------------------------------- transport -- */

static void conn_unref(conn *c)
{
    if (--c->refs == 0) {
        close(c->fd);
        free(c);
    }
}

/* Break c: its waiters fail (CKR_DEVICE_ERROR) and, if current, the next call reconnects. */
static void conn_fail(conn *c)
{
    if (!c->broken) {
        c->broken = 1;
        shutdown(c->fd, SHUT_RDWR);
        for (waiter *w = c->waiters; w != NULL; w = w->next)
            if (!w->done) {
                w->done = 1;
                pthread_cond_signal(&w->cond);
            }
    }
    if (g_conn == c) {
        g_conn = NULL;
        g_sized = g_once = 0;
        sign_ops_clear(); /* the server's sessions went with the connection */
        conn_unref(c);
    }
}

static void disconnect(void)
{
    if (g_conn != NULL)
        conn_fail(g_conn);
}

static int send_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t k = send(fd, b, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Send several buffers with as few system calls as the socket allows (one, usually). */
static int sendv_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr mh;
        memset(&mh, 0, sizeof(mh));
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)n;
        ssize_t k = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        size_t done = (size_t)k;
        while (n > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

static int recv_all(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t k = recv(fd, b, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/*
 * Settings from the module's configuration file, for applications that cannot set
 * environment variables (browsers, Java, daemons): $PQHSM_PKCS11_CONF, else
 * /etc/pqhsm/pkcs11.conf.  Lines are "key = value"; '#' starts a comment; unknown keys
 * and malformed or over-long lines are ignored.  Keys: "server" (the address, as in
 * PQHSM_SERVER_ADDRESS) and "extension" ("on" or "off", as PQHSM_EXTENSION).
 */
#define CONF_DEFAULT "/etc/pqhsm/pkcs11.conf"
#define CONF_LINE 1024

typedef struct {
    char server[CONF_LINE];
    int extension_off; /* -1: not set */
} conf_t;

static char *trim(char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    size_t n = strlen(p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\n' || p[n - 1] == '\r'))
        p[--n] = '\0';
    return p;
}

static void read_conf(conf_t *conf)
{
    memset(conf, 0, sizeof(*conf));
    conf->extension_off = -1;
    const char *path = getenv("PQHSM_PKCS11_CONF");
    if (path == NULL || *path == '\0')
        path = CONF_DEFAULT;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return;
    char line[CONF_LINE];
    int skipping = 0; /* inside an over-long line: drop it to its end */
    while (fgets(line, sizeof(line), f) != NULL) {
        size_t n = strlen(line);
        int whole = n > 0 && line[n - 1] == '\n';
        if (skipping || (!whole && !feof(f))) {
            skipping = !whole;
            continue;
        }
        char *p = trim(line);
        if (*p == '#' || *p == '\0')
            continue;
        char *eq = strchr(p, '=');
        if (eq == NULL)
            continue;
        *eq = '\0';
        char *key = trim(p);
        char *value = trim(eq + 1);
        if (strcmp(key, "server") == 0 && strlen(value) < sizeof(conf->server))
            memcpy(conf->server, value, strlen(value) + 1);
        else if (strcmp(key, "extension") == 0)
            conf->extension_off = strcmp(value, "off") == 0;
    }
    fclose(f);
}

static int parse_address(struct sockaddr_un *sa, const conf_t *conf)
{
    const char *addr = getenv("PQHSM_SERVER_ADDRESS");
    if (addr == NULL || *addr == '\0')
        addr = getenv("P11_KIT_SERVER_ADDRESS");
    if (addr == NULL || *addr == '\0')
        addr = conf->server;
    static const char prefix[] = "unix:path=";
    if (strncmp(addr, prefix, sizeof(prefix) - 1) != 0)
        return -1;
    const char *path = addr + sizeof(prefix) - 1;
    size_t n = strlen(path);
    if (n == 0 || path[0] != '/' || n >= sizeof(sa->sun_path))
        return -1;
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, n);
    return 0;
}

static CK_RV transact(wbuf *req, uint32_t call_id, const char *reply_sig, rbuf *reply);

/* Read one reply frame: its code and body (malloc'ed); -1 when the socket or frame is bad. */
static int read_frame(int fd, uint32_t *code, uint8_t **body, uint32_t *blen)
{
    uint8_t hdr[12];
    if (recv_all(fd, hdr, sizeof(hdr)) < 0)
        return -1;
    rbuf h = {hdr, sizeof(hdr), 0, 0};
    uint32_t rcode = r_u32(&h), olen = r_u32(&h), n = r_u32(&h);
    if (olen > MAX_MESSAGE || n > MAX_MESSAGE || n < 8)
        return -1;
    uint8_t *buf = malloc(olen > n ? olen : n);
    if (buf == NULL)
        return -1;
    if ((olen && recv_all(fd, buf, olen) < 0) || recv_all(fd, buf, n) < 0) {
        free(buf);
        return -1;
    }
    *code = rcode;
    *body = buf;
    *blen = n;
    return 0;
}

/*
 * Multiplexed: send the frame, then wait for the reply with its code, reading replies
 * for every waiting thread while none else does.  Called and returns with g_lock held
 * (released meanwhile) and a reference on c; 0 with the reply's body, or -1 (c broke).
 */
static int mux_exchange(conn *c, uint32_t code, struct iovec *iov, uint8_t **body,
                        uint32_t *blen)
{
    waiter w;
    memset(&w, 0, sizeof(w));
    w.code = code;
    if (pthread_cond_init(&w.cond, NULL) != 0) {
        conn_fail(c);
        return -1;
    }
    w.next = c->waiters;
    c->waiters = &w;
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_lock(&g_send_lock);
    int sent = sendv_all(c->fd, iov, 3) == 0;
    pthread_mutex_unlock(&g_send_lock);
    pthread_mutex_lock(&g_lock);
    if (!sent)
        conn_fail(c);
    while (!w.done) {
        if (c->reading) {
            pthread_cond_wait(&w.cond, &g_lock);
            continue;
        }
        c->reading = 1;
        pthread_mutex_unlock(&g_lock);
        uint32_t rcode = 0, n = 0;
        uint8_t *b = NULL;
        int got = read_frame(c->fd, &rcode, &b, &n) == 0;
        pthread_mutex_lock(&g_lock);
        c->reading = 0;
        waiter *t = c->waiters;
        while (got && t != NULL && t->code != rcode)
            t = t->next;
        if (!got || t == NULL || t->done) { /* unreadable, or a code nobody waits for */
            free(b);
            conn_fail(c);
            break;
        }
        t->body = b;
        t->blen = n;
        t->done = 1;
        if (t != &w)
            pthread_cond_signal(&t->cond);
    }
    waiter **pp = &c->waiters;
    while (*pp != &w)
        pp = &(*pp)->next;
    *pp = w.next;
    if (!c->reading && c->waiters != NULL) /* hand the reading on */
        pthread_cond_signal(&c->waiters->cond);
    pthread_cond_destroy(&w.cond);
    if (w.body == NULL)
        return -1;
    *body = w.body;
    *blen = w.blen;
    return 0;
}

/* A connected socket that agreed on a version byte (offered, or 0), or -1. */
static int negotiate(const struct sockaddr_un *sa, uint8_t offer, uint8_t *agreed)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {IO_TIMEOUT_SECONDS, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    uint8_t version = offer;
    if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) < 0 ||
        send_all(fd, &version, 1) < 0 || recv_all(fd, &version, 1) < 0 ||
        (version != 0 && version != offer)) {
        close(fd);
        return -1;
    }
    *agreed = version;
    return fd;
}

/* Open the socket, exchange the version byte and send C_Initialize. */
static CK_RV connect_server(void)
{
    struct sockaddr_un sa;
    conf_t conf;
    g_sized = g_once = 0;
    sign_ops_clear();
    read_conf(&conf);
    if (parse_address(&sa, &conf) < 0)
        return CKR_DEVICE_ERROR;
    /*
     * Offer the pqhsm extension, v4 first; a server that does not know a version closes
     * the connection, so v3, v2 and v1 are offered next; a plain p11-kit server answers 0
     * (version 0 only).
     * PQHSM_EXTENSION=off offers version 0: the connection then shows exactly what
     * p11-kit-client.so shows (for clients such as libp11 0.4.12 that stop enumerating
     * keys at the first key type they do not know); so does "extension = off" in the
     * configuration file when the variable is not set.
     */
    const char *ext = getenv("PQHSM_EXTENSION");
    int off = (ext != NULL && *ext != '\0') ? strcmp(ext, "off") == 0 : conf.extension_off == 1;
    uint8_t version = 0;
    int fd = negotiate(&sa, off ? 0 : EXTENSION_VERSION_4, &version);
    if (fd < 0 && !off)
        fd = negotiate(&sa, EXTENSION_VERSION_3, &version);
    if (fd < 0 && !off)
        fd = negotiate(&sa, EXTENSION_VERSION_2, &version);
    if (fd < 0 && !off)
        fd = negotiate(&sa, EXTENSION_VERSION, &version);
    if (fd < 0)
        return CKR_DEVICE_ERROR;
    conn *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        close(fd);
        return CKR_DEVICE_ERROR;
    }
    c->fd = fd;
    c->refs = 1;
    g_conn = c;
    g_generation++;
    g_sized = version == EXTENSION_VERSION_2 || version == EXTENSION_VERSION_3 ||
              version == EXTENSION_VERSION_4;
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_Initialize, "ayyay");
    w_ay(&w, HANDSHAKE, sizeof(HANDSHAKE) - 1);
    w_u8(&w, 0);         /* reserved string present: no */
    w_ay(&w, NULL, 0);   /* reserved string */
    CK_RV rv = transact(&w, CALL_Initialize, "", &r); /* not multiplexed yet */
    if (rv == CKR_OK && !r_done(&r))
        rv = CKR_DEVICE_ERROR;
    free(r.data);
    if (rv != CKR_OK)
        disconnect();
    else {
        c->mux = version == EXTENSION_VERSION_3 || version == EXTENSION_VERSION_4;
        g_once = version == EXTENSION_VERSION_4;
    }
    return rv;
}

/*
 * Send one request (frees req) and read its reply into *reply, positioned after the
 * signature.  An error reply returns its CKR; any malformed reply CKR_DEVICE_ERROR
 * (and the connection is dropped).  reply->data is always safe to free().
 */
static CK_RV transact(wbuf *req, uint32_t call_id, const char *reply_sig, rbuf *reply)
{
    memset(reply, 0, sizeof(*reply));
    if (req->failed) {
        w_release(req);
        return req->too_big ? CKR_ARGUMENTS_BAD : CKR_HOST_MEMORY;
    }
    if (g_conn == NULL) {
        CK_RV rv = connect_server();
        if (rv != CKR_OK) {
            w_release(req);
            return CKR_DEVICE_ERROR;
        }
    }
    conn *c = g_conn;
    uint32_t code = ++g_code;
    wbuf head;
    memset(&head, 0, sizeof(head));
    w_u32(&head, code);
    w_u32(&head, (uint32_t)(sizeof(MODULE_NAME) - 1));
    w_u32(&head, (uint32_t)req->len);
    /* header, options (the module name), body: one sendmsg */
    struct iovec iov[3] = {
        {head.data, head.len},
        {(void *)MODULE_NAME, sizeof(MODULE_NAME) - 1},
        {req->data, req->len},
    };
    uint8_t *buf = NULL;
    uint32_t blen = 0, rcode = code;
    int ok = !head.failed;
    c->refs++; /* c stays valid until this call is done with it, even once broken */
    if (ok && c->mux)
        ok = mux_exchange(c, code, iov, &buf, &blen) == 0;
    else if (ok)
        ok = sendv_all(c->fd, iov, 3) == 0 && read_frame(c->fd, &rcode, &buf, &blen) == 0;
    free(head.data);
    w_release(req);
    if (!ok || rcode != code) {
        free(buf);
        conn_fail(c);
        conn_unref(c);
        return CKR_DEVICE_ERROR;
    }
    reply->data = buf;
    reply->len = blen;

    uint32_t got_id = r_u32(reply);
    const uint8_t *sig;
    uint32_t siglen;
    if (r_bytes(reply, &sig, &siglen) < 0 || sig == NULL)
        goto malformed;
    if (got_id == CALL_ERROR) {
        if (siglen != 1 || sig[0] != 'u')
            goto malformed;
        CK_RV err = r_ulong(reply);
        if (!r_done(reply) || err == CKR_OK)
            goto malformed;
        free(reply->data);
        memset(reply, 0, sizeof(*reply));
        conn_unref(c);
        return err;
    }
    if (got_id != call_id || siglen != strlen(reply_sig) || memcmp(sig, reply_sig, siglen) != 0)
        goto malformed;
    conn_unref(c);
    return CKR_OK;

malformed:
    free(reply->data);
    memset(reply, 0, sizeof(*reply));
    conn_fail(c);
    conn_unref(c);
    return CKR_DEVICE_ERROR;
}

/* Finish a reply: every byte consumed, or the connection is dropped. */
static CK_RV finish(rbuf *r, CK_RV rv)
{
    if (!r_done(r)) {
        disconnect();
        rv = CKR_DEVICE_ERROR;
    }
    free(r->data);
    r->data = NULL;
    return rv;
}

/* ------------------------------------------------------------ call bracketing -- */

static int ready(void) { return g_initialized && g_pid == getpid(); }

#define ENTER()                                          \
    do {                                                 \
        pthread_mutex_lock(&g_lock);                     \
        if (!ready()) {                                  \
            pthread_mutex_unlock(&g_lock);               \
            return CKR_CRYPTOKI_NOT_INITIALIZED;         \
        }                                                \
    } while (0)

#define LEAVE(rv)                                        \
    do {                                                 \
        CK_RV leave_rv_ = (rv);                          \
        pthread_mutex_unlock(&g_lock);                   \
        return leave_rv_;                                \
    } while (0)

/* A call whose reply is empty. */
static CK_RV simple_call(wbuf *w, uint32_t call_id)
{
    rbuf r;
    CK_RV rv = transact(w, call_id, "", &r);
    if (rv != CKR_OK)
        return rv;
    return finish(&r, CKR_OK);
}

/* "au" reply into a caller's CK_ULONG array (PKCS#11 size conventions). */
static CK_RV read_ulong_array(rbuf *r, CK_ULONG *out, CK_ULONG *count)
{
    uint8_t valid = r_u8(r);
    uint32_t n = r_u32(r);
    if (r->bad || valid > 1 || n > MAX_ARRAY) {
        r->bad = 1;
        return CKR_DEVICE_ERROR;
    }
    if (!valid) {
        CK_RV rv = (out != NULL && *count < n) ? CKR_BUFFER_TOO_SMALL : CKR_OK;
        *count = n;
        return rv;
    }
    if (out == NULL || n > *count) {
        for (uint32_t i = 0; i < n; i++)
            (void)r_u64(r);
        CK_RV rv = out == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL;
        *count = n;
        return rv;
    }
    for (uint32_t i = 0; i < n; i++)
        out[i] = r_ulong(r);
    *count = n;
    return CKR_OK;
}

/* "ay" reply into a caller's byte buffer (PKCS#11 size conventions). */
static CK_RV read_byte_out(rbuf *r, CK_BYTE_PTR out, CK_ULONG_PTR len)
{
    uint8_t valid = r_u8(r);
    if (r->bad || valid > 1) {
        r->bad = 1;
        return CKR_DEVICE_ERROR;
    }
    if (!valid) {
        uint32_t n = r_u32(r);
        if (r->bad || n > MAX_MESSAGE) {
            r->bad = 1;
            return CKR_DEVICE_ERROR;
        }
        CK_RV rv = out != NULL ? CKR_BUFFER_TOO_SMALL : CKR_OK;
        *len = n;
        return rv;
    }
    const uint8_t *p;
    uint32_t n;
    if (r_bytes(r, &p, &n) < 0)
        return CKR_DEVICE_ERROR;
    if (out == NULL) {
        *len = n;
        return CKR_OK;
    }
    if (n > *len) {
        *len = n;
        return CKR_BUFFER_TOO_SMALL;
    }
    if (n)
        memcpy(out, p, n);
    *len = n;
    return CKR_OK;
}

/* ------------------------------------------------------- attribute encodings -- */

enum value_kind { K_BYTE, K_ULONG, K_TEMPLATE, K_MECHANISMS, K_BYTES };

static enum value_kind value_kind(CK_ATTRIBUTE_TYPE t)
{
    switch (t) {
    case 0x001: case 0x002: case 0x086: case 0x103: case 0x104: case 0x105: case 0x106:
    case 0x107: case 0x108: case 0x109: case 0x10a: case 0x10b: case 0x10c: case 0x162:
    case 0x163: case 0x164: case 0x165: case 0x170: case 0x171: case 0x200: case 0x202:
    case 0x210: case 0x301: case 0x302: case 0x405:
        return K_BYTE;
    case 0x000: case 0x080: case 0x087: case 0x088: case 0x100: case 0x121: case 0x133:
    case 0x134: case 0x160: case 0x161: case 0x166: case 0x201: case 0x300: case 0x400:
    case 0x401: case 0x402: case 0x403: case 0x404: case 0x406: case 0x500:
        return K_ULONG;
    case CKA_WRAP_TEMPLATE: case CKA_UNWRAP_TEMPLATE: case CKA_DERIVE_TEMPLATE:
        return K_TEMPLATE;
    case CKA_ALLOWED_MECHANISMS:
        return K_MECHANISMS;
    default:
        return K_BYTES; /* includes CK_DATE and, in 0.24, CKA_PARAMETER_SET */
    }
}

/* One "aA" request attribute (a search template). */
static CK_RV write_attribute(wbuf *w, const CK_ATTRIBUTE *a)
{
    if (a->type > 0xffffffffUL)
        return CKR_ATTRIBUTE_TYPE_INVALID;
    w_u32(w, (uint32_t)a->type);
    if (a->pValue == NULL) {
        w_u8(w, 0);
        return CKR_OK;
    }
    w_u8(w, 1);
    if (a->ulValueLen >= MAX_MESSAGE)
        return CKR_ATTRIBUTE_VALUE_INVALID;
    w_u32(w, (uint32_t)a->ulValueLen);
    switch (value_kind(a->type)) {
    case K_BYTE:
        if (a->ulValueLen != sizeof(CK_BBOOL))
            return CKR_ATTRIBUTE_VALUE_INVALID;
        w_u8(w, *(const CK_BBOOL *)a->pValue);
        return CKR_OK;
    case K_ULONG:
        if (a->ulValueLen != sizeof(CK_ULONG))
            return CKR_ATTRIBUTE_VALUE_INVALID;
        w_u64(w, *(const CK_ULONG *)a->pValue);
        return CKR_OK;
    case K_MECHANISMS: {
        if (a->ulValueLen % sizeof(CK_ULONG) != 0 ||
            a->ulValueLen / sizeof(CK_ULONG) > MAX_ARRAY)
            return CKR_ATTRIBUTE_VALUE_INVALID;
        CK_ULONG n = a->ulValueLen / sizeof(CK_ULONG);
        const CK_ULONG *m = a->pValue;
        w_u32(w, (uint32_t)n);
        for (CK_ULONG i = 0; i < n; i++)
            w_u64(w, m[i]);
        return CKR_OK;
    }
    case K_TEMPLATE:
        return CKR_ATTRIBUTE_TYPE_INVALID; /* not in this slice */
    case K_BYTES:
    default:
        w_bytes(w, a->pValue, a->ulValueLen);
        return CKR_OK;
    }
}

/* Skip (bounds-checked) one reply attribute value of a nested template. */
static void skip_attribute(rbuf *r, int depth);

static void skip_value(rbuf *r, CK_ATTRIBUTE_TYPE type, int depth)
{
    const uint8_t *p;
    uint32_t n;
    switch (value_kind(type)) {
    case K_BYTE:
        (void)r_u8(r);
        break;
    case K_ULONG:
        (void)r_u64(r);
        break;
    case K_MECHANISMS:
        n = r_u32(r);
        if (n > MAX_ARRAY)
            r->bad = 1;
        for (uint32_t i = 0; i < n && !r->bad; i++)
            (void)r_u64(r);
        break;
    case K_TEMPLATE:
        n = r_u32(r);
        if (n > MAX_ARRAY || depth >= MAX_DEPTH)
            r->bad = 1;
        for (uint32_t i = 0; i < n && !r->bad; i++)
            skip_attribute(r, depth + 1);
        break;
    case K_BYTES:
    default:
        (void)r_bytes(r, &p, &n);
        break;
    }
}

static void skip_attribute(rbuf *r, int depth)
{
    CK_ATTRIBUTE_TYPE type = r_u32(r);
    uint8_t valid = r_u8(r);
    if (valid > 1)
        r->bad = 1;
    if (!valid || r->bad)
        return;
    if (r_u32(r) > MAX_MESSAGE)
        r->bad = 1;
    skip_value(r, type, depth);
}

/*
 * One "aA" reply attribute into the caller's template entry.  Returns CKR_OK,
 * CKR_BUFFER_TOO_SMALL or CKR_ATTRIBUTE_TYPE_INVALID for this attribute; a malformed
 * value sets r->bad.
 */
static CK_RV read_attribute(rbuf *r, CK_ATTRIBUTE *a)
{
    uint32_t type = r_u32(r);
    uint8_t valid = r_u8(r);
    if (r->bad || valid > 1 || type != a->type) {
        r->bad = 1;
        return CKR_DEVICE_ERROR;
    }
    if (!valid) {
        a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return CKR_OK; /* the trailing return code says why */
    }
    uint32_t clen = r_u32(r);
    if (clen > MAX_MESSAGE) {
        r->bad = 1;
        return CKR_DEVICE_ERROR;
    }
    CK_BBOOL b = 0;
    CK_ULONG ul = 0;
    const uint8_t *src = NULL;
    size_t size = 0;
    uint32_t count = 0;
    switch (value_kind(a->type)) {
    case K_BYTE:
        b = r_u8(r);
        src = &b;
        size = sizeof(b);
        break;
    case K_ULONG:
        ul = r_ulong(r);
        src = (const uint8_t *)&ul;
        size = sizeof(ul);
        break;
    case K_MECHANISMS:
        count = r_u32(r);
        if (count > MAX_ARRAY || (size_t)count * 8 > r->len - r->pos) {
            r->bad = 1;
            return CKR_DEVICE_ERROR;
        }
        size = (size_t)count * sizeof(CK_ULONG);
        break;
    case K_TEMPLATE:
        skip_value(r, a->type, 0);
        a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return CKR_ATTRIBUTE_TYPE_INVALID; /* templates: not in this slice */
    case K_BYTES:
    default: {
        uint32_t n;
        if (r_bytes(r, &src, &n) < 0)
            return CKR_DEVICE_ERROR;
        size = n;
        break;
    }
    }
    if (r->bad)
        return CKR_DEVICE_ERROR;
    if (a->pValue == NULL) {
        for (uint32_t i = 0; i < count; i++)
            (void)r_u64(r);
        a->ulValueLen = size;
        return CKR_OK;
    }
    if (a->ulValueLen < size) {
        for (uint32_t i = 0; i < count; i++)
            (void)r_u64(r);
        a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return CKR_BUFFER_TOO_SMALL;
    }
    if (count) {
        CK_ULONG *m = a->pValue;
        for (uint32_t i = 0; i < count; i++)
            m[i] = r_ulong(r);
    } else if (size) {
        memcpy(a->pValue, src, size);
    }
    a->ulValueLen = size;
    return CKR_OK;
}

/* ------------------------------------------------------------ the C_* calls -- */

CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
    if (pInitArgs != NULL) {
        const CK_C_INITIALIZE_ARGS *args = pInitArgs;
        int n = (args->CreateMutex != NULL) + (args->DestroyMutex != NULL) +
                (args->LockMutex != NULL) + (args->UnlockMutex != NULL);
        if (args->pReserved != NULL || (n != 0 && n != 4))
            return CKR_ARGUMENTS_BAD;
        /*
         * With CKF_OS_LOCKING_OK (or no callbacks) we lock with pthreads.  Callbacks
         * without CKF_OS_LOCKING_OK are not used in this slice: pthread mutexes are the
         * native primitive such callbacks wrap on Linux (see README).
         */
    }
    pthread_mutex_lock(&g_lock);
    if (!g_atfork_registered) {
        if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0) {
            pthread_mutex_unlock(&g_lock);
            return CKR_CANT_LOCK;
        }
        g_atfork_registered = 1;
    }
    if (g_initialized && g_pid == getpid()) {
        pthread_mutex_unlock(&g_lock);
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    if (g_initialized) {
        /* A forked child: the inherited connection (and its waiters, threads of the
         * parent) belongs to the parent; only our copy of the descriptor is closed. */
        if (g_conn != NULL) {
            close(g_conn->fd);
            free(g_conn);
        }
        g_conn = NULL;
        g_sized = g_once = 0;
        sign_ops_clear();
        g_initialized = 0;
    }
    CK_RV rv = connect_server();
    if (rv == CKR_OK) {
        g_initialized = 1;
        g_pid = getpid();
    }
    pthread_mutex_unlock(&g_lock);
    return rv;
}

CK_RV C_Finalize(CK_VOID_PTR pReserved)
{
    if (pReserved != NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    if (g_conn != NULL) {
        wbuf w;
        w_begin(&w, CALL_Finalize, "");
        (void)simple_call(&w, CALL_Finalize); /* best effort */
    }
    disconnect();
    g_initialized = 0;
    LEAVE(CKR_OK);
}

/* C_GetInfo of the 2.40 list (C_GetInfo) and of the 3.0 list (get_info_3_0). */
static CK_RV get_info(CK_INFO_PTR pInfo, CK_BYTE major, CK_BYTE minor)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetInfo, "");
    CK_RV rv = transact(&w, CALL_GetInfo, "vsusv", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_INFO info;
    memset(&info, 0, sizeof(info));
    r_version(&r, &info.cryptokiVersion);
    r_string(&r, info.manufacturerID, sizeof(info.manufacturerID));
    info.flags = r_ulong(&r);
    r_string(&r, info.libraryDescription, sizeof(info.libraryDescription));
    r_version(&r, &info.libraryVersion);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK) {
        /* The interface's version, whatever the server says. */
        info.cryptokiVersion.major = major;
        info.cryptokiVersion.minor = minor;
        *pInfo = info;
    }
    LEAVE(rv);
}

CK_RV C_GetInfo(CK_INFO_PTR pInfo) { return get_info(pInfo, 2, 40); }

static CK_RV get_info_3_0(CK_INFO_PTR pInfo) { return get_info(pInfo, 3, 0); }

CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount)
{
    if (pulCount == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetSlotList, "yfu");
    w_u8(&w, tokenPresent ? 1 : 0);
    w_fbuf(&w, pSlotList, *pulCount);
    CK_RV rv = transact(&w, CALL_GetSlotList, "au", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    rv = read_ulong_array(&r, pSlotList, pulCount);
    LEAVE(finish(&r, rv));
}

CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetSlotInfo, "u");
    w_u64(&w, slotID);
    CK_RV rv = transact(&w, CALL_GetSlotInfo, "ssuvv", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_SLOT_INFO info;
    memset(&info, 0, sizeof(info));
    r_string(&r, info.slotDescription, sizeof(info.slotDescription));
    r_string(&r, info.manufacturerID, sizeof(info.manufacturerID));
    info.flags = r_ulong(&r);
    r_version(&r, &info.hardwareVersion);
    r_version(&r, &info.firmwareVersion);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK)
        *pInfo = info;
    LEAVE(rv);
}

CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetTokenInfo, "u");
    w_u64(&w, slotID);
    CK_RV rv = transact(&w, CALL_GetTokenInfo, "ssssuuuuuuuuuuuvvs", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_TOKEN_INFO info;
    memset(&info, 0, sizeof(info));
    r_string(&r, info.label, sizeof(info.label));
    r_string(&r, info.manufacturerID, sizeof(info.manufacturerID));
    r_string(&r, info.model, sizeof(info.model));
    r_string(&r, info.serialNumber, sizeof(info.serialNumber));
    info.flags = r_ulong(&r);
    info.ulMaxSessionCount = r_ulong(&r);
    info.ulSessionCount = r_ulong(&r);
    info.ulMaxRwSessionCount = r_ulong(&r);
    info.ulRwSessionCount = r_ulong(&r);
    info.ulMaxPinLen = r_ulong(&r);
    info.ulMinPinLen = r_ulong(&r);
    info.ulTotalPublicMemory = r_ulong(&r);
    info.ulFreePublicMemory = r_ulong(&r);
    info.ulTotalPrivateMemory = r_ulong(&r);
    info.ulFreePrivateMemory = r_ulong(&r);
    r_version(&r, &info.hardwareVersion);
    r_version(&r, &info.firmwareVersion);
    r_string(&r, info.utcTime, sizeof(info.utcTime));
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK)
        *pInfo = info;
    LEAVE(rv);
}

CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,
                         CK_ULONG_PTR pulCount)
{
    if (pulCount == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetMechanismList, "ufu");
    w_u64(&w, slotID);
    w_fbuf(&w, pMechanismList, *pulCount);
    CK_RV rv = transact(&w, CALL_GetMechanismList, "au", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    rv = read_ulong_array(&r, pMechanismList, pulCount);
    LEAVE(finish(&r, rv));
}

CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetMechanismInfo, "uu");
    w_u64(&w, slotID);
    w_u64(&w, type);
    CK_RV rv = transact(&w, CALL_GetMechanismInfo, "uuu", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_MECHANISM_INFO info;
    info.ulMinKeySize = r_ulong(&r);
    info.ulMaxKeySize = r_ulong(&r);
    info.flags = r_ulong(&r);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK)
        *pInfo = info;
    LEAVE(rv);
}

CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,
                    CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession)
{
    (void)pApplication; /* no notifications in this slice */
    (void)Notify;
    if (phSession == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_OpenSession, "uu");
    w_u64(&w, slotID);
    w_u64(&w, flags);
    CK_RV rv = transact(&w, CALL_OpenSession, "u", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_SESSION_HANDLE h = r_ulong(&r);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK)
        *phSession = h;
    LEAVE(rv);
}

static CK_RV one_ulong_call(uint32_t call_id, CK_ULONG value)
{
    ENTER();
    wbuf w;
    w_begin(&w, call_id, "u");
    w_u64(&w, value);
    CK_RV rv = simple_call(&w, call_id);
    if (call_id == CALL_CloseSession) {
        sign_op_forget(value);
        inits_forget(value);
    }
    else if (call_id == CALL_CloseAllSessions || (call_id == CALL_Logout && rv == CKR_OK))
        sign_ops_clear(); /* one slot: every session; logout ends every operation */
    LEAVE(rv);
}

CK_RV C_CloseSession(CK_SESSION_HANDLE hSession)
{
    return one_ulong_call(CALL_CloseSession, hSession);
}

CK_RV C_CloseAllSessions(CK_SLOT_ID slotID)
{
    return one_ulong_call(CALL_CloseAllSessions, slotID);
}

CK_RV C_Logout(CK_SESSION_HANDLE hSession) { return one_ulong_call(CALL_Logout, hSession); }

CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession)
{
    return one_ulong_call(CALL_FindObjectsFinal, hSession);
}

CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetSessionInfo, "u");
    w_u64(&w, hSession);
    CK_RV rv = transact(&w, CALL_GetSessionInfo, "uuuu", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_SESSION_INFO info;
    info.slotID = r_ulong(&r);
    info.state = r_ulong(&r);
    info.flags = r_ulong(&r);
    info.ulDeviceError = r_ulong(&r);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK)
        *pInfo = info;
    LEAVE(rv);
}

CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,
              CK_ULONG ulPinLen)
{
    if (pPin == NULL && ulPinLen != 0)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    w_begin(&w, CALL_Login, "uuay");
    w.secret = 1;
    w_u64(&w, hSession);
    w_u64(&w, userType);
    w_ay(&w, pPin, ulPinLen);
    CK_RV rv = simple_call(&w, CALL_Login);
    LEAVE(rv);
}

CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
    if ((pTemplate == NULL && ulCount != 0) || ulCount > MAX_ARRAY)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GetAttributeValue, "uufA");
    w_u64(&w, hSession);
    w_u64(&w, hObject);
    w_u32(&w, (uint32_t)ulCount);
    for (CK_ULONG i = 0; i < ulCount; i++) {
        if (pTemplate[i].type > 0xffffffffUL) {
            free(w.data);
            LEAVE(CKR_ATTRIBUTE_TYPE_INVALID);
        }
        w_u32(&w, (uint32_t)pTemplate[i].type);
        w_fbuf(&w, pTemplate[i].pValue, pTemplate[i].ulValueLen);
    }
    CK_RV rv = transact(&w, CALL_GetAttributeValue, "aAu", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_RV local = CKR_OK;
    if (r_u32(&r) != ulCount)
        r.bad = 1;
    for (CK_ULONG i = 0; i < ulCount && !r.bad; i++) {
        CK_RV one = read_attribute(&r, &pTemplate[i]);
        if (one != CKR_OK && local == CKR_OK)
            local = one;
    }
    CK_RV remote = r_ulong(&r);
    rv = remote != CKR_OK ? remote : local;
    LEAVE(finish(&r, rv));
}

CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
    if ((pTemplate == NULL && ulCount != 0) || ulCount > MAX_ARRAY)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    w_begin(&w, CALL_FindObjectsInit, "uaA");
    w_u64(&w, hSession);
    w_u32(&w, (uint32_t)ulCount);
    for (CK_ULONG i = 0; i < ulCount; i++) {
        CK_RV rv = write_attribute(&w, &pTemplate[i]);
        if (rv != CKR_OK) {
            free(w.data);
            LEAVE(rv);
        }
    }
    LEAVE(simple_call(&w, CALL_FindObjectsInit));
}

CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,
                    CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount)
{
    if (phObject == NULL || pulObjectCount == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_FindObjects, "ufu");
    w_u64(&w, hSession);
    w_fbuf(&w, phObject, ulMaxObjectCount > MAX_ARRAY ? MAX_ARRAY : ulMaxObjectCount);
    CK_RV rv = transact(&w, CALL_FindObjects, "au", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_ULONG count = ulMaxObjectCount;
    rv = read_ulong_array(&r, phObject, &count);
    if (rv == CKR_BUFFER_TOO_SMALL)
        rv = CKR_DEVICE_ERROR; /* the server must not answer more than asked */
    if (rv == CKR_OK)
        *pulObjectCount = count;
    rv = finish(&r, rv);
    if (rv == CKR_DEVICE_ERROR)
        disconnect();
    LEAVE(rv);
}

static void put_be(uint8_t *p, uint64_t v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
}

/*
 * The pqhsm extension's parameter encoding (README.md), carried as the M field's bytes:
 * CKM_ML_DSA, CKM_PQHSM_DUAL, CKM_PQHSM_COMPOSITE
 *               CK_SIGN_ADDITIONAL_CONTEXT -> u64 hedgeVariant | u32 len | context
 * CKM_EDDSA     CK_EDDSA_PARAMS            -> u8 phFlag | u32 len | context
 * Every other mechanism: no parameter.  No parameter at all encodes as zero bytes.
 */
static CK_RV encode_sign_param(const CK_MECHANISM *m, uint8_t *out, size_t *out_len)
{
    *out_len = 0;
    if (m->pParameter == NULL) {
        if (m->ulParameterLen != 0)
            return CKR_MECHANISM_PARAM_INVALID;
        return CKR_OK;
    }
    if (m->mechanism == CKM_ML_DSA || m->mechanism == CKM_PQHSM_DUAL ||
        m->mechanism == CKM_PQHSM_COMPOSITE) {
        if (m->ulParameterLen != sizeof(CK_SIGN_ADDITIONAL_CONTEXT))
            return CKR_MECHANISM_PARAM_INVALID;
        const CK_SIGN_ADDITIONAL_CONTEXT *p = m->pParameter;
        if (p->ulContextLen > MAX_SIGN_CONTEXT || (p->pContext == NULL && p->ulContextLen != 0))
            return CKR_MECHANISM_PARAM_INVALID;
        put_be(out, p->hedgeVariant, 8);
        put_be(out + 8, p->ulContextLen, 4);
        if (p->ulContextLen)
            memcpy(out + 12, p->pContext, p->ulContextLen);
        *out_len = 12 + (size_t)p->ulContextLen;
        return CKR_OK;
    }
    if (m->mechanism == CKM_EDDSA) {
        if (m->ulParameterLen != sizeof(CK_EDDSA_PARAMS))
            return CKR_MECHANISM_PARAM_INVALID;
        const CK_EDDSA_PARAMS *p = m->pParameter;
        if (p->ulContextDataLen > MAX_SIGN_CONTEXT ||
            (p->pContextData == NULL && p->ulContextDataLen != 0))
            return CKR_MECHANISM_PARAM_INVALID;
        out[0] = p->phFlag ? 1 : 0;
        put_be(out + 1, p->ulContextDataLen, 4);
        if (p->ulContextDataLen)
            memcpy(out + 5, p->pContextData, p->ulContextDataLen);
        *out_len = 5 + (size_t)p->ulContextDataLen;
        return CKR_OK;
    }
    return CKR_MECHANISM_PARAM_INVALID; /* no other mechanism takes a parameter */
}

/* The "uMu" fields of C_SignInit/C_VerifyInit (and the start of CALL_SignOnce). */
static void w_init_fields(wbuf *w, CK_SESSION_HANDLE h, const sign_init_t *init)
{
    w_u64(w, h);
    w_u32(w, init->mech);
    w_bytes(w, init->param_len ? init->param : NULL, init->param_len); /* empty: none */
    w_u64(w, init->key);
}

/* Send C_SignInit on an extended (v2+) connection; its reply gives *length. */
static CK_RV send_sign_init(CK_SESSION_HANDLE h, const sign_init_t *init, CK_ULONG *length)
{
    wbuf w;
    w_begin(&w, CALL_SignInit, "uMu");
    w_init_fields(&w, h, init);
    rbuf r;
    CK_RV rv = transact(&w, CALL_SignInit, "u", &r);
    if (rv != CKR_OK)
        return rv;
    *length = r_ulong(&r);
    return finish(&r, CKR_OK);
}

/* C_SignInit and C_VerifyInit: "uMu" with the extension's parameter encoding. */
static CK_RV operation_init(uint32_t call_id, CK_SESSION_HANDLE hSession,
                            CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey)
{
    if (pMechanism == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pMechanism->mechanism > 0xffffffffUL || pMechanism->mechanism == CKM_RSA_PKCS_PSS ||
        pMechanism->mechanism == CKM_RSA_PKCS_OAEP)
        return CKR_MECHANISM_INVALID;
    sign_init_t init;
    memset(&init, 0, sizeof(init));
    size_t param_len = 0;
    CK_RV prv = encode_sign_param(pMechanism, init.param, &param_len);
    if (prv != CKR_OK)
        return prv;
    init.mech = (uint32_t)pMechanism->mechanism;
    init.param_len = (uint32_t)param_len;
    init.key = hKey;
    ENTER();
    if (g_conn == NULL && connect_server() != CKR_OK) /* the reply form depends on the server */
        LEAVE(CKR_DEVICE_ERROR);
    if (call_id != CALL_SignInit || !g_sized) {
        wbuf w;
        w_begin(&w, call_id, "uMu");
        w_init_fields(&w, hSession, &init);
        LEAVE(simple_call(&w, call_id));
    }
    int op = sign_op_find(hSession);
    if (op >= 0 && g_sign_ops[op].deferred)
        LEAVE(CKR_OPERATION_ACTIVE); /* what the server answers for an active one */
    /* v4: the session's last accepted C_SignInit again: it goes with the C_Sign */
    int k = g_once && op < 0 ? inits_match(hSession, &init) : -1;
    if (k >= 0 && sign_op_remember(hSession, g_inits[k].length, &init) >= 0)
        LEAVE(CKR_OK);
    /* extended C_SignInit replies "u": the length size queries will be answered */
    unsigned generation = g_generation;
    CK_ULONG length = 0;
    CK_RV rv = send_sign_init(hSession, &init, &length);
    /* (while this thread waited, another may have seen the connection break and opened
     * a new one: this operation died with the old one) */
    if (generation == g_generation && rv == CKR_OK && length > 0 && length < MAX_MESSAGE) {
        sign_op_remember(hSession, length, NULL);
        if (g_once)
            inits_remember(hSession, &init, length);
    } else if (generation == g_generation && rv != CKR_OK) {
        inits_forget(hSession);
    }
    LEAVE(rv);
}

CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey)
{
    return operation_init(CALL_SignInit, hSession, pMechanism, hKey);
}

/*
 * A size query (NULL output) or a short buffer on a signing operation whose length the
 * server gave at C_SignInit: set *len and say so (1); else 0 and the server decides.
 */
static int answer_size_locally(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR len)
{
    int i = sign_op_find(h);
    if (i < 0 || (out != NULL && *len >= g_sign_ops[i].length))
        return 0;
    *len = g_sign_ops[i].length;
    return 1;
}

/*
 * Send a request whose reply is "ay" into the caller's buffer (PKCS#11 size rules).  For
 * C_Sign/C_SignFinal, only a size answer keeps the operation active on the server.
 */
static CK_RV output_call(wbuf *w, uint32_t call_id, CK_SESSION_HANDLE hSession,
                         CK_BYTE_PTR pOut, CK_ULONG_PTR pulOutLen)
{
    rbuf r;
    CK_RV rv = transact(w, call_id, "ay", &r);
    if (rv == CKR_OK)
        rv = finish(&r, read_byte_out(&r, pOut, pulOutLen));
    int sized = rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && pOut == NULL);
    if ((call_id == CALL_Sign || call_id == CALL_SignFinal) && !sized)
        sign_op_forget(hSession);
    return rv;
}

/*
 * C_Sign on a deferred operation (v4, g_inits): its C_SignInit and this C_Sign in one
 * request.  The server answers as C_Sign would, or with the C_SignInit's error; a short
 * buffer leaves its operation active (then no longer deferred).
 */
static CK_RV sign_once(CK_SESSION_HANDLE h, int op, const CK_BYTE *data, CK_ULONG len,
                       CK_BYTE_PTR pOut, CK_ULONG_PTR pulOutLen)
{
    const sign_init_t *init = &g_sign_ops[op].init;
    wbuf w;
    w_begin(&w, CALL_SignOnce, "uMuayfy");
    w_init_fields(&w, h, init);
    w_ay(&w, data, len);
    w_fbuf(&w, pOut, *pulOutLen);
    unsigned generation = g_generation;
    rbuf r;
    CK_RV rv = transact(&w, CALL_SignOnce, "ay", &r);
    if (rv == CKR_OK)
        rv = finish(&r, read_byte_out(&r, pOut, pulOutLen));
    if (generation != g_generation)
        return rv; /* the connection, and every operation, went meanwhile */
    if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && pOut == NULL)) {
        sign_op_remember(h, *pulOutLen, NULL); /* the server's operation now */
        return rv;
    }
    sign_op_forget(h);
    if (rv != CKR_OK)
        inits_forget(h); /* the next C_SignInit asks the server again */
    return rv;
}

/* A deferred operation used by anything but C_Sign: send its C_SignInit now. */
static CK_RV send_deferred(CK_SESSION_HANDLE h)
{
    int op = sign_op_find(h);
    if (op < 0 || !g_sign_ops[op].deferred)
        return CKR_OK;
    sign_init_t init = g_sign_ops[op].init;
    unsigned generation = g_generation;
    CK_ULONG length = 0;
    CK_RV rv = send_sign_init(h, &init, &length);
    if (generation != g_generation)
        return rv;
    if (rv == CKR_OK && length > 0 && length < MAX_MESSAGE) {
        sign_op_remember(h, length, NULL);
        return rv;
    }
    sign_op_forget(h); /* failed, or a length this module does not answer with */
    if (rv != CKR_OK)
        inits_forget(h);
    return rv;
}

/*
 * C_Sign and C_Digest ("uayfy" -> "ay"): data in, bytes out, with PKCS#11's size query
 * (NULL output) and short-buffer rules decided by the server.
 */
static CK_RV data_out_call(uint32_t call_id, CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData,
                           CK_ULONG ulDataLen, CK_BYTE_PTR pOut, CK_ULONG_PTR pulOutLen)
{
    if ((pData == NULL && ulDataLen != 0) || pulOutLen == NULL)
        return CKR_ARGUMENTS_BAD;
    if (ulDataLen >= MAX_MESSAGE)
        return CKR_DATA_LEN_RANGE;
    ENTER();
    if (call_id == CALL_Sign && answer_size_locally(hSession, pOut, pulOutLen))
        LEAVE(pOut == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL);
    static const CK_BYTE empty[1] = {0};
    int op = call_id == CALL_Sign ? sign_op_find(hSession) : -1;
    if (op >= 0 && g_sign_ops[op].deferred)
        LEAVE(sign_once(hSession, op, pData ? pData : empty, ulDataLen, pOut, pulOutLen));
    wbuf w;
    w_begin(&w, call_id, "uayfy");
    w_u64(&w, hSession);
    w_ay(&w, pData ? pData : empty, ulDataLen);
    w_fbuf(&w, pOut, *pulOutLen);
    LEAVE(output_call(&w, call_id, hSession, pOut, pulOutLen));
}

/* C_SignFinal and C_DigestFinal ("ufy" -> "ay"), the same output rules. */
static CK_RV final_out_call(uint32_t call_id, CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOut,
                            CK_ULONG_PTR pulOutLen)
{
    if (pulOutLen == NULL)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    if (call_id == CALL_SignFinal && answer_size_locally(hSession, pOut, pulOutLen))
        LEAVE(pOut == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL);
    CK_RV sent = call_id == CALL_SignFinal ? send_deferred(hSession) : CKR_OK;
    if (sent != CKR_OK)
        LEAVE(sent);
    wbuf w;
    w_begin(&w, call_id, "ufy");
    w_u64(&w, hSession);
    w_fbuf(&w, pOut, *pulOutLen);
    LEAVE(output_call(&w, call_id, hSession, pOut, pulOutLen));
}

CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
             CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
    return data_out_call(CALL_Sign, hSession, pData, ulDataLen, pSignature, pulSignatureLen);
}

/*
 * Multi-part signing and verification.  A part is sent in SIGN_CHUNK requests (the
 * server caps the whole message at 64 MiB); the first failing request's CKR is returned
 * and, as the server ends the operation on any error, nothing more is sent.
 */
static CK_RV update_call(uint32_t call_id, CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                         CK_ULONG ulPartLen)
{
    if (pPart == NULL && ulPartLen != 0)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    static const CK_BYTE empty[1] = {0};
    CK_ULONG done = 0;
    CK_RV rv = call_id == CALL_SignUpdate ? send_deferred(hSession) : CKR_OK;
    if (rv != CKR_OK)
        LEAVE(rv);
    do {
        CK_ULONG n = ulPartLen - done > SIGN_CHUNK ? SIGN_CHUNK : ulPartLen - done;
        wbuf w;
        w_begin(&w, call_id, "uay");
        w_u64(&w, hSession);
        w_ay(&w, pPart ? pPart + done : empty, n);
        rv = simple_call(&w, call_id);
        done += n;
    } while (rv == CKR_OK && done < ulPartLen);
    if (rv != CKR_OK && call_id == CALL_SignUpdate)
        sign_op_forget(hSession); /* the server ends an operation on any error */
    LEAVE(rv);
}

CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return update_call(CALL_SignUpdate, hSession, pPart, ulPartLen);
}

CK_RV C_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                   CK_OBJECT_HANDLE hKey)
{
    return operation_init(CALL_VerifyInit, hSession, pMechanism, hKey);
}

CK_RV C_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
               CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)
{
    if ((pData == NULL && ulDataLen != 0) || (pSignature == NULL && ulSignatureLen != 0))
        return CKR_ARGUMENTS_BAD;
    if (ulDataLen >= MAX_MESSAGE)
        return CKR_DATA_LEN_RANGE;
    if (ulSignatureLen >= MAX_MESSAGE)
        return CKR_SIGNATURE_LEN_RANGE;
    ENTER();
    static const CK_BYTE empty[1] = {0};
    wbuf w;
    w_begin(&w, CALL_Verify, "uayay");
    w_u64(&w, hSession);
    w_ay(&w, pData ? pData : empty, ulDataLen);
    w_ay(&w, pSignature ? pSignature : empty, ulSignatureLen);
    LEAVE(simple_call(&w, CALL_Verify));
}

CK_RV C_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return update_call(CALL_VerifyUpdate, hSession, pPart, ulPartLen);
}

CK_RV C_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)
{
    if (pSignature == NULL && ulSignatureLen != 0)
        return CKR_ARGUMENTS_BAD;
    if (ulSignatureLen >= MAX_MESSAGE)
        return CKR_SIGNATURE_LEN_RANGE;
    ENTER();
    static const CK_BYTE empty[1] = {0};
    wbuf w;
    w_begin(&w, CALL_VerifyFinal, "uay");
    w_u64(&w, hSession);
    w_ay(&w, pSignature ? pSignature : empty, ulSignatureLen);
    LEAVE(simple_call(&w, CALL_VerifyFinal));
}

CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                  CK_ULONG_PTR pulSignatureLen)
{
    return final_out_call(CALL_SignFinal, hSession, pSignature, pulSignatureLen);
}

CK_RV C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen)
{
    if (RandomData == NULL && ulRandomLen != 0)
        return CKR_ARGUMENTS_BAD;
    ENTER();
    CK_RV rv = CKR_OK;
    CK_ULONG done = 0;
    do {
        CK_ULONG want = ulRandomLen - done > RANDOM_CHUNK ? RANDOM_CHUNK : ulRandomLen - done;
        wbuf w;
        rbuf r;
        w_begin(&w, CALL_GenerateRandom, "ufy");
        w_u64(&w, hSession);
        w_u32(&w, (uint32_t)want);
        rv = transact(&w, CALL_GenerateRandom, "ay", &r);
        if (rv != CKR_OK)
            break;
        CK_BYTE scratch[1];
        CK_ULONG got = want;
        rv = read_byte_out(&r, want ? RandomData + done : scratch, &got);
        if (rv == CKR_OK && got != want)
            rv = CKR_DEVICE_ERROR;
        if (want == 0 && rv == CKR_BUFFER_TOO_SMALL)
            rv = CKR_OK; /* zero bytes: the server answers a length-only array */
        rv = finish(&r, rv);
        if (rv != CKR_OK)
            break;
        done += want;
    } while (done < ulRandomLen);
    LEAVE(rv);
}

/* ------------------------------------------- digests, key pairs, destroy -- */

CK_RV C_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism)
{
    if (pMechanism == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pMechanism->mechanism > 0xffffffffUL)
        return CKR_MECHANISM_INVALID;
    if (pMechanism->pParameter != NULL || pMechanism->ulParameterLen != 0)
        return CKR_MECHANISM_PARAM_INVALID; /* SHA-2 digests take no parameter */
    ENTER();
    wbuf w;
    w_begin(&w, CALL_DigestInit, "uM");
    w_u64(&w, hSession);
    w_u32(&w, (uint32_t)pMechanism->mechanism);
    w_bytes(&w, NULL, 0);
    LEAVE(simple_call(&w, CALL_DigestInit));
}

CK_RV C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
               CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen)
{
    return data_out_call(CALL_Digest, hSession, pData, ulDataLen, pDigest, pulDigestLen);
}

CK_RV C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return update_call(CALL_DigestUpdate, hSession, pPart, ulPartLen);
}

CK_RV C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen)
{
    return final_out_call(CALL_DigestFinal, hSession, pDigest, pulDigestLen);
}

static CK_RV write_template(wbuf *w, const CK_ATTRIBUTE *t, CK_ULONG n)
{
    w_u32(w, (uint32_t)n);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_RV rv = write_attribute(w, &t[i]);
        if (rv != CKR_OK)
            return rv;
    }
    return CKR_OK;
}

CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                        CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount,
                        CK_ATTRIBUTE_PTR pPrivateKeyTemplate,
                        CK_ULONG ulPrivateKeyAttributeCount, CK_OBJECT_HANDLE_PTR phPublicKey,
                        CK_OBJECT_HANDLE_PTR phPrivateKey)
{
    if (pMechanism == NULL || phPublicKey == NULL || phPrivateKey == NULL ||
        (pPublicKeyTemplate == NULL && ulPublicKeyAttributeCount != 0) ||
        (pPrivateKeyTemplate == NULL && ulPrivateKeyAttributeCount != 0) ||
        ulPublicKeyAttributeCount > MAX_ARRAY || ulPrivateKeyAttributeCount > MAX_ARRAY)
        return CKR_ARGUMENTS_BAD;
    if (pMechanism->mechanism > 0xffffffffUL)
        return CKR_MECHANISM_INVALID;
    if (pMechanism->pParameter != NULL || pMechanism->ulParameterLen != 0)
        return CKR_MECHANISM_PARAM_INVALID; /* the key-pair generators take none */
    ENTER();
    wbuf w;
    rbuf r;
    w_begin(&w, CALL_GenerateKeyPair, "uMaAaA");
    w_u64(&w, hSession);
    w_u32(&w, (uint32_t)pMechanism->mechanism);
    w_bytes(&w, NULL, 0);
    CK_RV rv = write_template(&w, pPublicKeyTemplate, ulPublicKeyAttributeCount);
    if (rv == CKR_OK)
        rv = write_template(&w, pPrivateKeyTemplate, ulPrivateKeyAttributeCount);
    if (rv != CKR_OK) {
        free(w.data);
        LEAVE(rv);
    }
    rv = transact(&w, CALL_GenerateKeyPair, "uu", &r);
    if (rv != CKR_OK)
        LEAVE(rv);
    CK_OBJECT_HANDLE pub = r_ulong(&r);
    CK_OBJECT_HANDLE priv = r_ulong(&r);
    rv = finish(&r, CKR_OK);
    if (rv == CKR_OK) {
        *phPublicKey = pub;
        *phPrivateKey = priv;
    }
    LEAVE(rv);
}

CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)
{
    ENTER();
    wbuf w;
    w_begin(&w, CALL_DestroyObject, "uu");
    w_u64(&w, hSession);
    w_u64(&w, hObject);
    CK_RV rv = simple_call(&w, CALL_DestroyObject);
    memset(g_inits, 0, sizeof(g_inits)); /* a remembered C_SignInit may name it */
    LEAVE(rv);
}

/* --------------------------------------------------- unsupported + the table -- */

/*
 * Every other v2.40 entry: CKR_FUNCTION_NOT_SUPPORTED.  IMPL_<name> marks the calls
 * defined above; the preprocessor emits a stub for the rest.
 */
#define PROBE_ ~, 1
#define SECOND_(a, b, ...) b
#define IS_PROBE_(...) SECOND_(__VA_ARGS__, 0, )
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define IS_IMPL(name) IS_PROBE_(CAT(IMPL_, name))

#define IMPL_C_Initialize PROBE_
#define IMPL_C_Finalize PROBE_
#define IMPL_C_GetInfo PROBE_
#define IMPL_C_GetFunctionList PROBE_
#define IMPL_C_GetSlotList PROBE_
#define IMPL_C_GetSlotInfo PROBE_
#define IMPL_C_GetTokenInfo PROBE_
#define IMPL_C_GetMechanismList PROBE_
#define IMPL_C_GetMechanismInfo PROBE_
#define IMPL_C_OpenSession PROBE_
#define IMPL_C_CloseSession PROBE_
#define IMPL_C_CloseAllSessions PROBE_
#define IMPL_C_GetSessionInfo PROBE_
#define IMPL_C_Login PROBE_
#define IMPL_C_Logout PROBE_
#define IMPL_C_GetAttributeValue PROBE_
#define IMPL_C_FindObjectsInit PROBE_
#define IMPL_C_FindObjects PROBE_
#define IMPL_C_FindObjectsFinal PROBE_
#define IMPL_C_SignInit PROBE_
#define IMPL_C_Sign PROBE_
#define IMPL_C_SignUpdate PROBE_
#define IMPL_C_SignFinal PROBE_
#define IMPL_C_VerifyInit PROBE_
#define IMPL_C_Verify PROBE_
#define IMPL_C_VerifyUpdate PROBE_
#define IMPL_C_VerifyFinal PROBE_
#define IMPL_C_GenerateRandom PROBE_
#define IMPL_C_DigestInit PROBE_
#define IMPL_C_Digest PROBE_
#define IMPL_C_DigestUpdate PROBE_
#define IMPL_C_DigestFinal PROBE_
#define IMPL_C_GenerateKeyPair PROBE_
#define IMPL_C_DestroyObject PROBE_

#define STUB_1(name, params)
#define STUB_0(name, params) \
    CK_RV name params { return CKR_FUNCTION_NOT_SUPPORTED; }
#define STUB(name, params) CAT(STUB_, IS_IMPL(name))(name, params)

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
CK_PKCS11_FUNCTIONS(STUB)
#pragma GCC diagnostic pop

static CK_FUNCTION_LIST g_function_list = {
    {2, 40},
#define ENTRY(name, params) name,
    CK_PKCS11_FUNCTIONS(ENTRY)
#undef ENTRY
};

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (ppFunctionList == NULL)
        return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &g_function_list;
    return CKR_OK;
}

/* ------------------------------------------------------ PKCS#11 3.0 interfaces -- */

/*
 * The 3.0 list: the same v2.40 entries (C_GetInfo reports 3.0) followed by the 24
 * functions 3.0 appends.  Apart from C_GetInterfaceList and C_GetInterface they return
 * CKR_FUNCTION_NOT_SUPPORTED (no message-based operations, no named users, no
 * C_SessionCancel yet).
 */
#define STUB30_(name, params) \
    static CK_RV name params { return CKR_FUNCTION_NOT_SUPPORTED; }
#define STUB30(name, params) CAT(STUB30_, IS_IMPL(name))(name, params)
#define STUB30_1(name, params)
#define STUB30_0(name, params) STUB30_(name, params)
#define IMPL_C_GetInterfaceList PROBE_
#define IMPL_C_GetInterface PROBE_

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
CK_PKCS11_3_0_FUNCTIONS(STUB30)
#pragma GCC diagnostic pop

/* The 3.0 list's entries: the same functions, except C_GetInfo (reports 3.0). */
#define V30_C_GetInfo PROBE_
#define ENTRY30_1(name) get_info_3_0
#define ENTRY30_0(name) name
#define ENTRY30(name, params) CAT(ENTRY30_, IS_PROBE_(CAT(V30_, name)))(name),

static CK_FUNCTION_LIST_3_0 g_function_list_3_0 = {
    {3, 0},
    CK_PKCS11_FUNCTIONS(ENTRY30)
    CK_PKCS11_3_0_FUNCTIONS(ENTRY30)
};

static CK_CHAR g_interface_name[] = "PKCS 11";

/*
 * Two interfaces named "PKCS 11": 3.0 (the default, first) and 2.40.  Neither sets
 * CKF_INTERFACE_FORK_SAFE: after fork() a child gets no copy of its parent's sessions or
 * login (it must call C_Initialize and starts afresh, see README).
 */
static CK_INTERFACE g_interfaces[] = {
    {g_interface_name, &g_function_list_3_0, 0},
    {g_interface_name, &g_function_list, 0},
};
#define N_INTERFACES (sizeof(g_interfaces) / sizeof(g_interfaces[0]))

CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount)
{
    if (pulCount == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pInterfacesList == NULL) {
        *pulCount = N_INTERFACES;
        return CKR_OK;
    }
    if (*pulCount < N_INTERFACES) {
        *pulCount = N_INTERFACES;
        return CKR_BUFFER_TOO_SMALL;
    }
    memcpy(pInterfacesList, g_interfaces, sizeof(g_interfaces));
    *pulCount = N_INTERFACES;
    return CKR_OK;
}

static CK_VERSION interface_version(const CK_INTERFACE *i)
{
    return *(const CK_VERSION *)i->pFunctionList; /* both lists begin with their version */
}

CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                     CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags)
{
    if (ppInterface == NULL)
        return CKR_ARGUMENTS_BAD;
    for (size_t i = 0; i < N_INTERFACES; i++) {
        CK_INTERFACE *it = &g_interfaces[i];
        CK_VERSION v = interface_version(it);
        if (pInterfaceName != NULL && strcmp((const char *)pInterfaceName,
                                             (const char *)it->pInterfaceName) != 0)
            continue;
        if (pVersion != NULL && (pVersion->major != v.major || pVersion->minor != v.minor))
            continue;
        if ((it->flags & flags) != flags)
            continue;
        *ppInterface = it;
        return CKR_OK;
    }
    return CKR_ARGUMENTS_BAD; /* no interface with that name, version and flags */
}
