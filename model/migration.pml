/*
 * migration.pml -- a Promela model of the pqhsm key-migration protocol (DESIGN.md §5, §6)
 * ======================================================================================
 *
 * Checked with spin 6.5.2, exhaustively (no bitstate hashing):
 *
 *     spin -a migration.pml
 *     gcc -O2 -DSAFETY -DNOREDUCE -o pan pan.c
 *     ./pan -m100000
 *
 * See model/README.md for the numbers, the bug variants and what they prove.
 *
 * WHAT IS MODELLED, AND WHERE IT LIVES IN THE REAL CODE
 * -----------------------------------------------------
 *
 *  proctype appliance  The pqhsm process: the migration engine (appliance/service.py,
 *                      Appliance) walking keys along the DESIGN §6 edges, one real
 *                      operation per Promela step, and the start-up recovery that runs
 *                      on every boot (and again on an operator's `pqhsm recover`).
 *                      Its volatile state is `mem[]` (the per-key state the running
 *                      process holds in memory, i.e. keys.replay() of the WAL) and the
 *                      locals k/e; a crash throws all of them away.
 *
 *  proctype token(k)   The PKCS#11 token's side of C_DestroyObject for key k
 *                      (Pkcs11Token.destroy_private_key).  `tok[k]` = the token holds a
 *                      private-key object with key k's CKA_ID.  The appliance issues a
 *                      destroy by setting `pend[k]` (the request is "in flight"); the
 *                      token performs it whenever it gets to it, and only then does the
 *                      call return.  A crash of the appliance may drop an in-flight
 *                      request or leave it queued at the token (a remote/serial token
 *                      keeps executing a command its host died during), in which case
 *                      it is performed at any later time -- even after the restart.
 *
 *  durable[], tail[]   The write-ahead log (appliance/wal/log.py, Wal): an append-only
 *                      sequence of transition records; a record is REC(key, from, to).
 *                      wal_append() is Wal.append (the frame is written, but only to the
 *                      page cache); wal_fsync() is Wal.commit (fsync: every appended record
 *                      becomes durable).  tail[0 .. tlen-1] holds the appended records not
 *                      yet fsync'd, oldest first.  A crash keeps ANY PREFIX of that tail
 *                      (all of it, part of it, or none of it: whatever the kernel wrote
 *                      back; Wal.open cuts a torn last frame) and the rest is gone.
 *                      The durable part of the log is immutable and replay
 *                      (keys.replay) is a left fold over it, so by default the model
 *                      stores the fold, durable[k] = the state key k's durable records
 *                      lead to, and makes replay's check (I6: each record leaves the
 *                      state its key is in, along an allowed edge) at the moment each
 *                      record becomes durable.  Compile with -DFULL_LOG to also keep
 *                      the durable records themselves in wal[0 .. wlen-1] and replay them
 *                      record by record at every boot: same verdicts, but the order of
 *                      the two keys' records then splits otherwise equal states (about
 *                      300 times as many; see README.md).  Keys are created CLASSICAL
 *                      before the model starts (their create/adopt records are the
 *                      implicit genesis of the log).
 *
 *  blob[]              The blob store (appliance/keystore/store.py, Keystore.write_blob /
 *                      remove_blob, fsio.atomic_write).  The blob is written to a temp
 *                      file, fsync'd, renamed over the target (atomic: the blob is either
 *                      there, complete, or not there), then the directory is fsync'd.
 *                      The temp stage is invisible (remove_stale_temps cleans it up), so
 *                      the model has: B_NONE, B_DUR (there and durable), B_NEW (renamed
 *                      in, directory not yet fsync'd: a crash may keep or lose it), B_DEL
 *                      (unlinked, directory not yet fsync'd: a crash may resurrect it).
 *
 *  proctype power      Crash injection: at any moment between two steps of any process
 *                      (also in the middle of recovery, and several times in a row, at
 *                      most MAXC times in all) the host loses power / the process is
 *                      killed.  The appliance's body is wrapped in `unless { crash_req }`,
 *                      so the crash escape is checked before EVERY statement of the
 *                      appliance (atomic/d_step blocks are one real indivisible step).
 *                      crash_effects() then applies what a crash does to the durable
 *                      world (WAL tail, blob directory entries, in-flight token requests)
 *                      and the appliance starts again at `boot`.
 *
 *  proctype watchdog   Deadlock detector: if nothing can move any more (`timeout`), the
 *                      appliance must be idle -- never stuck waiting in recovery or on
 *                      the token.  (Spin's own invalid-end-state check is switched off by
 *                      a never claim, so the model does it with this process.)
 *
 *  never claim         Checks the state invariants I1 and I5 in EVERY reachable state.
 *
 *  Ghost variables     astate[] (per-key state per the appended log = durable records
 *                      plus the tail, kept so the never claim can read it), before[]
 *                      (which keys could sign when the last crash hit), nback[], ncrash,
 *                      nrerun, snap_world, up, idle and the tag_* "labels" below.  They
 *                      are observers and bounds only: no modelled component reads them
 *                      to decide what to do.
 *
 * The edges, in DESIGN §6 order (one bullet = one step; a crash can fall between any two):
 *
 *   CLASSICAL -> HYBRID        blob rename; dir fsync; WAL append; fsync
 *                              (ML-DSA-87 keygen and sealing happen in host memory only:
 *                               a crash there is the same as a crash before the edge)
 *   HYBRID -> PQC_PREFERRED    WAL append; fsync
 *   HYBRID|PQC_PREFERRED -> FINALIZING   WAL append (carries the classical SPKI); fsync
 *   FINALIZING -> PQC_ONLY     (1) C_DestroyObject (issue; wait until the token did it)
 *                              (2) confirm absence with a search in a fresh session
 *                              (3) drop handles, zeroize host copies
 *                              (4) WAL append PQC_ONLY; (5) fsync
 *   HYBRID -> CLASSICAL        WAL append; fsync; unlink blob; dir fsync   (backward)
 *   PQC_PREFERRED -> HYBRID    WAL append; fsync                           (backward)
 *
 * Recovery (every boot; idempotent):
 *   R1 replay the durable WAL into mem[] (I6: every record is an allowed edge from the
 *      key's current state); R2 check every key: CLASSICAL/HYBRID/PQC_PREFERRED => the
 *      token holds its key, HYBRID..PQC_ONLY => its blob is there (the real code would mark
 *      a failing key DAMAGED and erase nothing for it; the model asserts it never happens);
 *   R3 finish every FINALIZING key with the same five steps as the forward edge;
 *   R4 remove blob files the WAL does not name (blob of a CLASSICAL key);
 *   R5 post-conditions (below); then the engine resumes normal operation.
 *
 * PROPERTIES (all safety; one exhaustive run checks all of them)
 * --------------------------------------------------------------
 *   I1  never claim, every state: a key whose WAL state is PQC_ONLY has no private key in
 *       the token.  Checked against the APPENDED log (astate), which is stronger than the
 *       durable one: a crash may keep an appended-but-unsynced record.
 *   I5  never claim, every state: every key keeps a signing capability, whether the
 *       durable log or the appended log is what survives the next crash:
 *           CANSIGN(s,k) = (token key present && s in {CL, HY, PP})
 *                       || (blob present      && s in {HY, PP, FI, PO})
 *       and in R5: every key that could sign when the last crash hit (before[]) can sign
 *       after recovery.
 *   I3/I5 at R2/R5: the artefacts the durable state needs are there (token key for
 *       CL/HY/PP, blob for HY/PP/FI/PO) and no orphan blob is left.
 *   I6  at every append (the record's `from` is the key's current state in the log it
 *       joins, and from->to is an edge of DESIGN §6) and at every replay of the durable log.
 *   REC at R5: no key is left FINALIZING once recovery has completed.
 *   I4  (idempotence part) an operator's second `pqhsm recover` appends no record, removes
 *       no blob and erases nothing.
 *   DEADLOCK  watchdog: the appliance never gets stuck.
 * Spin's "unreached" report for a clean run lists only the statements of the SECOND
 * recover() instance that would erase, append or unlink (it never has anything to do)
 * and the "still in the token after C_DestroyObject" printf of finalize (the destroy call
 * only returns once the token has done it, so verification never fails here).
 *
 * A failed assertion prints its text; each starts with a tag_* name (a hidden constant 0)
 * so spin's message says which property broke, e.g.
 *     pan:1: assertion violated (tag_I1||(...)) (at depth 57)
 *
 * BUG VARIANTS (compile the model with -D<name>; each must make spin report an error):
 *   BUG_WAL_BEFORE_ERASE     FINALIZING->PQC_ONLY appends+fsyncs the record, then erases  -> I1
 *   BUG_NO_RECOVERY_FINISH   recovery leaves FINALIZING keys alone                    -> REC
 *   BUG_BLOB_AFTER_RECORD    CLASSICAL->HYBRID commits the record before the blob     -> I3/I5
 *   BUG_DELETE_BLOB_FIRST    HYBRID->CLASSICAL unlinks the blob before the record     -> I3/I5
 *   BUG_NO_DIRSYNC           CLASSICAL->HYBRID appends without fsyncing the blob dir  -> I3/I5
 *   BUG_TRUST_CACHE          key state comes from a cache written at append time and is
 *                            not rebuilt from the durable WAL at boot (§5: "any cache
 *                            must be rebuildable from the WAL")                       -> I6
 * and one reachability probe (it must fail, which shows the deep paths are explored):
 *   REACH_ALL_PQC_ONLY       claims no run ends, after MAXC crashes, with every key
 *                            PQC_ONLY                                                 -> REACH
 *
 * WHAT IS ABSTRACTED AWAY
 * -----------------------
 *   - All cryptography: ML-DSA-87 keygen, blob sealing (ML-KEM + passphrase), the blob
 *     digest in the record, the WAL hash chain, CRCs, checkpoints and their signatures.
 *     "Blob present" stands for "the blob opens and its public key equals the WAL's" (I3);
 *     a blob is never corrupted, only present or absent.  I2 (non-extractable keys) is a
 *     property of key generation, not of this protocol, and is not modelled.
 *   - Group commit: the real Wal may put many records under one fsync (bulk operations);
 *     here every edge appends one record and fsyncs it.  The crash model still treats the
 *     unsynced tail as a sequence (any prefix survives), so a longer tail would be handled
 *     by the same code.  Erasure is never reordered with its record in either.
 *   - Concurrency between keys: the real engine serialises transitions of one key with a
 *     per-key lock and the WAL has a single writer (flock).  The model has one appliance
 *     process that runs one edge at a time but interleaves edges of different keys in any
 *     order, and the token works concurrently with it.
 *   - Everything outside the migration: signing requests (only the capability to sign is
 *     tracked), key creation/adoption (keys start CLASSICAL), passphrase changes, the
 *     anti-rollback head object, WAL corruption other than a torn tail (that refuses to
 *     start), DAMAGED handling (asserted never to be needed), the reason/actor/allow
 *     fields of backward edges, HA replication.
 *   - Bounds: NK keys (default 2), at most MAXC crashes (default 3), at most MAXBACK
 *     backward edges per key (default 1; otherwise HYBRID<->CLASSICAL loops would make
 *     the log unbounded), at most MAXRERUN operator-initiated `pqhsm recover` runs.
 */

#ifndef NK
#define NK 2
#endif
#ifndef MAXC
#define MAXC 3
#endif
#ifndef MAXBACK
#define MAXBACK 1
#endif
#ifndef MAXRERUN
#define MAXRERUN 1
#endif

/* Unsynced records at one time: every edge appends one record and fsyncs it. */
#define TAILMAX 1
/* FULL_LOG: per key at most 4 forward records plus 2 per backward edge (edge and redo). */
#define WALMAX (NK * (4 + 2 * MAXBACK))

/* Key states (KeyState in appliance/keys.py). */
#define CL 0   /* CLASSICAL */
#define HY 1   /* HYBRID */
#define PP 2   /* PQC_PREFERRED */
#define FI 3   /* FINALIZING */
#define PO 4   /* PQC_ONLY */

/* Edges the engine can pick (locals of the appliance). */
#define E_NONE    0
#define E_HY      1   /* CLASSICAL -> HYBRID */
#define E_PP      2   /* HYBRID -> PQC_PREFERRED */
#define E_FI      3   /* HYBRID | PQC_PREFERRED -> FINALIZING */
#define E_PO      4   /* FINALIZING -> PQC_ONLY */
#define E_BACK_CL 5   /* HYBRID -> CLASSICAL (backward) */
#define E_BACK_HY 6   /* PQC_PREFERRED -> HYBRID (backward) */

/* Blob directory entry of a key. */
#define B_NONE 0   /* no blob file */
#define B_DUR  1   /* blob file present, its directory entry durable */
#define B_NEW  2   /* renamed into place, directory not fsync'd yet: a crash may lose it */
#define B_DEL  3   /* unlinked, directory not fsync'd yet: a crash may bring it back */
#define BLOB(k) (blob[k] == B_DUR || blob[k] == B_NEW)

/* I6: the edges of DESIGN §6 (keys.EDGES / keys.edge_allowed). */
#define EDGE(f, t) (((f) == CL && (t) == HY) || ((f) == HY && (t) == PP) \
                 || (((f) == HY || (f) == PP) && (t) == FI) || ((f) == FI && (t) == PO) \
                 || ((f) == HY && (t) == CL) || ((f) == PP && (t) == HY))

/* A WAL record: key, from-state, to-state, in one byte. */
#define REC(k, f, t)  (((k) << 6) | ((f) << 3) | (t))
#define REC_KEY(r)    ((r) >> 6)
#define REC_FROM(r)   (((r) >> 3) & 7)
#define REC_TO(r)     ((r) & 7)

/* "Key k can sign if its state is s" (I5). */
#define CANSIGN(s, k) ((tok[k] && ((s) == CL || (s) == HY || (s) == PP)) \
                    || (BLOB(k) && (s) != CL))

/* The state invariants, per key and over all keys (the never claim reads these). */
#define I1_K(k) (astate[k] != PO || !tok[k])
#define I5_K(k) (CANSIGN(durable[k], k) && CANSIGN(astate[k], k))
#if NK == 2
#define I1_ALL (I1_K(0) && I1_K(1))
#define I5_ALL (I5_K(0) && I5_K(1))
#define ALL_PO (durable[0] == PO && durable[1] == PO)
#elif NK == 3
#define I1_ALL (I1_K(0) && I1_K(1) && I1_K(2))
#define I5_ALL (I5_K(0) && I5_K(1) && I5_K(2))
#define ALL_PO (durable[0] == PO && durable[1] == PO && durable[2] == PO)
#else
#error "NK must be 2 or 3"
#endif

/* ---- durable world ------------------------------------------------------------------ */
byte durable[NK];     /* the durable log, as its replay: state of key k per its durable records */
byte tail[TAILMAX];   /* the appended but not yet fsync'd records, oldest first */
byte tlen;            /* how many */
#ifdef FULL_LOG
byte wal[WALMAX];     /* the durable records themselves, in log order */
byte wlen;
#endif
bit  tok[NK] = 1;     /* token holds key k's classical private key (all start present) */
bit  pend[NK];        /* a C_DestroyObject for key k is in flight at the token */
byte blob[NK];        /* B_NONE / B_DUR / B_NEW / B_DEL */

/* ---- appliance volatile state (lost by a crash) ------------------------------------- */
byte mem[NK];         /* per-key state the running process believes (replay of the WAL) */

/* ---- ghosts (observers; nothing in the protocol reads them) ------------------------- */
byte astate[NK];      /* per-key state per the appended log (durable records + tail) */
bit  before[NK] = 1;  /* key could sign when the last crash hit (keys start CLASSICAL) */
byte nback[NK];       /* backward edges taken per key (bound MAXBACK) */
byte ncrash;          /* crashes so far (bound MAXC) */
byte nrerun;          /* operator `pqhsm recover` runs so far (bound MAXRERUN) */
bool crash_req;       /* power has decided the host dies now */
bool up;              /* recovery completed, engine running */
bool idle;            /* engine decided to stop taking edges */
int  snap_world;      /* idempotence check: the durable world before the second recovery */

hidden byte hi, hk, hf, ht;   /* scratch for d_steps (not part of the state) */
hidden int  hw;

/* Assertion labels: always 0, so `assert(tag_X || P)` checks P and names X in the message. */
hidden byte tag_I1, tag_I3, tag_I5, tag_I6, tag_REC, tag_IDEMPOTENT, tag_DEADLOCK, tag_GHOST;
hidden byte tag_REACH;

/* ---- WAL ---------------------------------------------------------------------------- */

/* Wal.append: write the frame (page cache only); durable only after the next wal_fsync. */
inline wal_append(k, f, t) {
    assert(tag_I6 || (astate[k] == (f) && EDGE(f, t)));
    assert(tlen < TAILMAX);
    tail[tlen] = REC(k, f, t);
    tlen++;
    astate[k] = (t);
#ifdef BUG_TRUST_CACHE
    mem[k] = (t);     /* the state cache is written as the record is appended */
#endif
}

/* The oldest n tail records become durable (an fsync: n = tlen; a crash: any n <= tlen);
 * the rest of the tail is gone.  This is replay's fold, one record at a time, with the
 * check replay makes (I6: the record leaves the state the key is in, along an edge). */
inline wal_make_durable(n) {
    hi = 0;
    do
    :: hi < n ->
        hk = REC_KEY(tail[hi]); hf = REC_FROM(tail[hi]); ht = REC_TO(tail[hi]);
        assert(tag_I6 || (durable[hk] == hf && EDGE(hf, ht)));
        durable[hk] = ht;
#ifdef FULL_LOG
        assert(wlen < WALMAX);
        wal[wlen] = tail[hi];
        wlen++;
#endif
        hi++
    :: else -> break
    od;
    hi = 0;
    do
    :: hi < TAILMAX -> tail[hi] = 0; hi++
    :: else -> break
    od;
    tlen = 0;
    hk = 0;
    do
    :: hk < NK -> astate[hk] = durable[hk]; hk++
    :: else -> break
    od;
    hi = 0; hk = 0; hf = 0; ht = 0
}

/* Wal.commit: fsync; returns after every appended record is durable. */
inline wal_fsync() {
    d_step { wal_make_durable(tlen) }
}

/* ---- blob store --------------------------------------------------------------------- */

/* Keystore.write_blob = fsio.atomic_write: tmp, fsync, rename (step 1), fsync dir (step 2). */
inline blob_write(k) {
    atomic { blob[k] = B_NEW };
#ifndef BUG_NO_DIRSYNC
    atomic { blob[k] = B_DUR }
#endif
}

/* Keystore.remove_blob: unlink (step 1), fsync dir (step 2). */
inline blob_remove(k) {
    atomic { blob[k] = B_DEL };
    atomic { blob[k] = B_NONE }
}

/* ---- the edges ---------------------------------------------------------------------- */

inline commit(k, f, t) {
    atomic { wal_append(k, f, t) };
    atomic { wal_fsync(); mem[k] = (t) }
}

/* CLASSICAL -> HYBRID.  ML-DSA-87 keygen + sealing are host-memory only (no step). */
inline to_hybrid(k) {
#ifdef BUG_BLOB_AFTER_RECORD
    commit(k, CL, HY);
    blob_write(k)
#else
    blob_write(k);
    commit(k, CL, HY)
#endif
}

/* HYBRID -> CLASSICAL (backward): record first, then delete the blob. */
inline back_to_classical(k) {
#ifdef BUG_DELETE_BLOB_FIRST
    blob_remove(k);
    commit(k, HY, CL)
#else
    commit(k, HY, CL);
    blob_remove(k)
#endif
}

/* FINALIZING -> PQC_ONLY: erasure before WAL.  Used by the engine and by recovery. */
inline finalize(k) {
#ifdef BUG_WAL_BEFORE_ERASE
    commit(k, FI, PO);
#endif
    /* (1) C_DestroyObject every private key with the CKA_ID (none found: nothing to do) */
    atomic {
        if
        :: tok[k] -> pend[k] = 1
        :: else -> skip
        fi
    };
    (pend[k] == 0);                     /* ... and the call returns */
    /* (2) confirm absence: C_FindObjects in a fresh session */
    if
    :: !tok[k] ->
        skip;                           /* (3) drop handles, zeroize host copies */
#ifndef BUG_WAL_BEFORE_ERASE
        commit(k, FI, PO)               /* (4) append PQC_ONLY, (5) fsync */
#endif
    :: else ->                          /* still there: stay FINALIZING, report it */
        printf("key %d still in the token after C_DestroyObject\n", k)
    fi
}

/* ---- crash -------------------------------------------------------------------------- */

/* What a crash does to the world; runs as the appliance's escape sequence (atomic). */
inline crash_effects() {
    /* the unsynced WAL tail: any prefix of it survives (Wal.open cuts a torn frame) */
    e = tlen;
    do
    :: e > 0 -> e--
    :: break
    od;
    wal_make_durable(e);
    k = 0;
    do
    :: k < NK ->
        /* blob directory entries whose directory was not fsync'd: either outcome */
        if
        :: blob[k] == B_NEW -> blob[k] = B_DUR
        :: blob[k] == B_NEW -> blob[k] = B_NONE
        :: blob[k] == B_DEL -> blob[k] = B_DUR
        :: blob[k] == B_DEL -> blob[k] = B_NONE
        :: else -> skip
        fi;
        /* an in-flight C_DestroyObject: lost, or still queued at the token */
        if
        :: pend[k] -> pend[k] = 0
        :: else -> skip
        fi;
        /* I5 bookkeeping: what could key k sign with when the power went? */
        if
        :: up -> before[k] = CANSIGN(mem[k], k)
        :: else -> skip               /* crashed during recovery: keep the older obligation */
        fi;
#ifndef BUG_TRUST_CACHE
        mem[k] = CL;                  /* volatile state is gone (canonical value) */
#endif
        k++
    :: else -> break
    od;
    k = 0;
    e = 0;
    snap_world = 0;
    up = false;
    idle = false;
    ncrash++;
    crash_req = false
}

/* ---- recovery ----------------------------------------------------------------------- */

/* durable key states, blobs and token keys, packed into v (the idempotence check) */
inline world_digest(v) {
    v = 0;
    hk = 0;
    do
    :: hk < NK -> v = v * 64 + durable[hk] * 8 + blob[hk] * 2 + tok[hk]; hk++
    :: else -> break
    od;
    hk = 0
}

inline recover() {
    /* R1: open the WAL and replay it; R2: check every key's artefacts (read-only) */
    d_step {
#ifndef BUG_TRUST_CACHE
        assert(tag_GHOST || tlen == 0);   /* nothing unsynced survives a restart */
#ifdef FULL_LOG
        hk = 0;
        do
        :: hk < NK -> mem[hk] = CL; hk++
        :: else -> break
        od;
        hi = 0;
        do
        :: hi < wlen ->
            hk = REC_KEY(wal[hi]); hf = REC_FROM(wal[hi]); ht = REC_TO(wal[hi]);
            assert(tag_I6 || (mem[hk] == hf && EDGE(hf, ht)));
            mem[hk] = ht;
            hi++
        :: else -> break
        od;
        hk = 0;
        do
        :: hk < NK -> assert(tag_GHOST || mem[hk] == durable[hk]); hk++
        :: else -> break
        od;
#else
        hk = 0;
        do
        :: hk < NK -> mem[hk] = durable[hk]; hk++
        :: else -> break
        od;
#endif
#endif
        hk = 0;
        do
        :: hk < NK ->
            assert(tag_I3 || ((mem[hk] == FI || mem[hk] == PO || tok[hk])
                           && (mem[hk] == CL || BLOB(hk))));
            hk++
        :: else -> break
        od;
        hk = 0; hi = 0; hf = 0; ht = 0
    };
    /* R3: finish every FINALIZING key */
    do
    :: k < NK ->
        if
#ifndef BUG_NO_RECOVERY_FINISH
        :: mem[k] == FI -> finalize(k)
#endif
        :: else -> skip
        fi;
        k++
    :: else -> break
    od;
    k = 0;
    /* R4: remove blob files the WAL does not name (blob of a CLASSICAL key) */
    do
    :: k < NK ->
        if
        :: mem[k] == CL && blob[k] != B_NONE -> blob_remove(k)
        :: else -> skip
        fi;
        k++
    :: else -> break
    od;
    k = 0;
    /* R5: post-conditions */
    d_step {
        hk = 0;
        do
        :: hk < NK ->
            assert(tag_REC || mem[hk] != FI);
            assert(tag_I3 || mem[hk] != CL || blob[hk] == B_NONE);
            assert(tag_I5 || !before[hk] || CANSIGN(mem[hk], hk));
            before[hk] = 0;
            hk++
        :: else -> break
        od;
        hk = 0;
        up = true
    }
}

/* ---- processes ---------------------------------------------------------------------- */

proctype token(byte k) {
end_token:
    do
    :: atomic { pend[k] -> tok[k] = 0; pend[k] = 0 }   /* C_DestroyObject takes effect */
    od
}

proctype power() {
end_power:
    do
    :: atomic { ncrash < MAXC && !crash_req -> crash_req = true }
    od
}

proctype watchdog() {
    timeout ->
#ifdef REACH_ALL_PQC_ONLY
    assert(tag_REACH || !(ncrash == MAXC && ALL_PO));
#endif
    assert(tag_DEADLOCK || idle)
}

proctype appliance() {
    byte k;   /* key being worked on */
    byte e;   /* edge chosen */
boot:
    {
        recover();
        /* the operator may run `pqhsm recover` again: it must change nothing */
        if
        :: nrerun < MAXRERUN ->
            d_step { nrerun++; world_digest(snap_world) };
            recover();
            d_step {
                world_digest(hw);
                assert(tag_IDEMPOTENT || (tlen == 0 && snap_world == hw));
                snap_world = 0; hw = 0
            }
        :: skip
        fi;
        /* normal operation: the engine walks keys along the edges, one at a time */
        do
        :: atomic {
               select (k : 0 .. NK - 1);
               if
               :: mem[k] == CL -> e = E_HY
               :: mem[k] == HY -> e = E_PP
               :: mem[k] == HY || mem[k] == PP -> e = E_FI
               :: mem[k] == FI -> e = E_PO
               :: mem[k] == HY && nback[k] < MAXBACK -> e = E_BACK_CL; nback[k]++
               :: mem[k] == PP && nback[k] < MAXBACK -> e = E_BACK_HY; nback[k]++
               :: else -> e = E_NONE
               fi
           };
           if
           :: e == E_HY -> to_hybrid(k)
           :: e == E_PP -> commit(k, HY, PP)
           :: e == E_FI -> commit(k, mem[k], FI)
           :: e == E_PO -> finalize(k)
           :: e == E_BACK_CL -> back_to_classical(k)
           :: e == E_BACK_HY -> commit(k, PP, HY)
           :: e == E_NONE -> skip
           fi;
           atomic { k = 0; e = 0 }
        :: atomic { idle = true; k = 0; e = 0 };
           break
        od;
end_idle:
        false
    } unless {
        atomic { crash_req -> crash_effects() }
    };
    goto boot
}

init {
    byte i;
    atomic {
        i = 0;
        do
        :: i < NK -> run token(i); i++
        :: else -> break
        od;
        i = 0;
        run power();
        run watchdog();
        run appliance()
    }
}

/* I1 and I5 in every reachable state.  Both branches are explored at every step, so
 * every state is checked against both assertions. */
never {
    do
    :: assert(tag_I1 || I1_ALL)
    :: assert(tag_I5 || I5_ALL)
    od
}
