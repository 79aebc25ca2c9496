/*
 * A C application with SIGPIPE at its default disposition (terminate), as
 * every C program has unless it changes it. It opens a session on slot
 * ID argv[2] (a member reached through p11-kit), reads a line from standard
 * input while the test kills that member's server-side worker, then calls
 * again: the library must turn the dead connection into CKR_DEVICE_ERROR,
 * not let SIGPIPE end the process.
 *
 * usage: sigpipe LIBRARY SLOT_ID
 */
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_RV (*initialize_fn)(void *);
typedef CK_RV (*open_session_fn)(CK_ULONG, CK_ULONG, void *, void *, CK_ULONG *);
typedef CK_RV (*random_fn)(CK_ULONG, unsigned char *, CK_ULONG);

#define CKF_SERIAL_SESSION 4UL

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBRARY SLOT_ID\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_DFL);
    void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    initialize_fn initialize = (initialize_fn)dlsym(library, "C_Initialize");
    open_session_fn open_session = (open_session_fn)dlsym(library, "C_OpenSession");
    random_fn generate_random = (random_fn)dlsym(library, "C_GenerateRandom");
    CK_ULONG slot = strtoul(argv[2], NULL, 10);
    CK_ULONG session = 0;
    unsigned char bytes[16];
    CK_RV rv = initialize(NULL);
    if (rv == 0) rv = open_session(slot, CKF_SERIAL_SESSION, NULL, NULL, &session);
    if (rv == 0) rv = generate_random(session, bytes, sizeof bytes);
    printf("before rv=0x%lx\n", rv);
    fflush(stdout);
    if (rv != 0) return 1;

    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    for (int i = 0; i < 3; i++) {
        rv = generate_random(session, bytes, sizeof bytes);
        printf("after rv=0x%lx\n", rv);
    }
    printf("alive\n");
    return 0;
}
