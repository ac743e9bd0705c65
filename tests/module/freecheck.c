/*
 * LD_PRELOAD probe for the module's PIN hygiene: reports every heap block that still
 * holds the PIN ($FREECHECK_PIN) when it is freed or handed to realloc (which may free
 * it as is), one line each to $FREECHECK_OUT.  $FREECHECK_SELFTEST frees such a block
 * at start-up, so a test can see the probe catch one.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void (*real_free)(void *);
static void *(*real_realloc)(void *, size_t);
static const char *pin;
static size_t pin_len;
static int out_fd = -1;

static void check(void *p)
{
    static const char line[] = "freed a heap block that held the PIN\n";
    if (p == NULL || out_fd < 0 || pin_len == 0)
        return;
    if (memmem(p, malloc_usable_size(p), pin, pin_len) != NULL)
        (void)!write(out_fd, line, sizeof(line) - 1);
}

void free(void *p)
{
    if (real_free == NULL)
        return; /* dlsym itself frees before it has found free(): leak that block */
    check(p);
    real_free(p);
}

void *realloc(void *p, size_t n)
{
    check(p);
    return real_realloc(p, n);
}

__attribute__((constructor)) static void start(void)
{
    real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    pin = getenv("FREECHECK_PIN");
    pin_len = pin ? strlen(pin) : 0;
    const char *out = getenv("FREECHECK_OUT");
    if (out != NULL)
        out_fd = open(out, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (getenv("FREECHECK_SELFTEST") != NULL && pin_len) {
        char *block = malloc(pin_len + 1); /* built with -fno-builtin: not elided */
        if (block != NULL) {
            memcpy(block, pin, pin_len + 1);
            free(block);
        }
    }
}
