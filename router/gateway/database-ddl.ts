/**
 * CREATE DATABASE and DROP DATABASE sent through the gateway: the one place a
 * client changes which databases exist. The gateway recognizes them so that a
 * database made (or dropped) in Postgres is registered (or deregistered) in the
 * topology, hosted on the shard group that ran the statement. A cheap prefilter
 * runs on each idle-point query; only what it flags is parsed (libpg-query).
 */
import { loadModule, parseSync } from 'libpg-query';

export interface DatabaseDdl {
  op: 'create' | 'drop';
  /** The database's name as Postgres stores it (identifier quoting and case folding applied). */
  name: string;
}

/** Both statements must be a query's only statement (Postgres refuses them in a transaction block). */
const PREFILTER = /^(?:\s|\/\*[\s\S]*?\*\/|--[^\n]*\n)*(?:create|drop)\s+database\b/i;

let loaded: Promise<void> | undefined;
let ready = false;
/** Loads the WASM parser once; call before serving. */
export function loadDdlParser(): Promise<void> {
  loaded ??= loadModule().then(() => {
    ready = true;
  });
  return loaded;
}

/** What the query does to the set of databases, or undefined when it is not one such statement. */
export function databaseDdl(sql: string): DatabaseDdl | undefined {
  if (!ready || !PREFILTER.test(sql)) return undefined;
  let stmts: Array<{ stmt: Record<string, any> }>;
  try {
    stmts = (parseSync(sql) as { stmts?: Array<{ stmt: Record<string, any> }> }).stmts ?? [];
  } catch {
    return undefined; // Postgres answers the syntax error itself
  }
  if (stmts.length !== 1) return undefined;
  const stmt = stmts[0].stmt;
  if (stmt.CreatedbStmt) return { op: 'create', name: String(stmt.CreatedbStmt.dbname) };
  if (stmt.DropdbStmt) return { op: 'drop', name: String(stmt.DropdbStmt.dbname) };
  return undefined;
}
