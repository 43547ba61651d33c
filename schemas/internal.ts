/**
 * Schemas the project keeps inside users' databases (the consensus rule, CDC
 * bookkeeping, the 2PC decision log, sharded sequences, workflow positions).
 * They are never streamed by CDC and never moved by a workflow: a consumer sees
 * user tables only.
 */
export const INTERNAL_SCHEMAS: ReadonlySet<string> = new Set(['multigres', 'mg_cdc', 'mg_twopc', 'mg_sharding', 'mg_materializer']);
