/*
 * A C application with SIGPIPE at its default disposition (terminate)
 * that starts pkcs11-ha while one member's network path accepts, greets
 * and closes: the member library's first C_Initialize writes to a closed
 * connection. pkcs11-ha must turn that into a member that is down, not let
 * SIGPIPE end the process.
 *
 * usage: startup_sigpipe LIBRARY
 */
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_RV (*initialize_fn)(void *);
typedef CK_RV (*finalize_fn)(void *);
typedef CK_RV (*slot_list_fn)(unsigned char, CK_ULONG *, CK_ULONG *);

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s LIBRARY\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_DFL);
    void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    initialize_fn initialize = (initialize_fn)dlsym(library, "C_Initialize");
    finalize_fn finalize = (finalize_fn)dlsym(library, "C_Finalize");
    slot_list_fn slot_list = (slot_list_fn)dlsym(library, "C_GetSlotList");
    CK_RV rv = initialize(NULL);
    printf("initialize rv=0x%lx\n", rv);
    CK_ULONG count = 0;
    if (rv == 0) rv = slot_list(1, NULL, &count);
    printf("slots rv=0x%lx\n", rv);
    if (rv == 0) rv = finalize(NULL);
    printf("alive\n");
    fflush(stdout);
    return rv == 0 ? 0 : 1;
}
