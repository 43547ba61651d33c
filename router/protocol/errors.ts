/** Errors as Postgres reports them: a severity, a SQLSTATE and a message. */
export const SQLSTATE = {
  PROTOCOL_VIOLATION: '08P01',
  CONNECTION_FAILURE: '08006',
  CONNECTION_EXCEPTION: '08000',
  SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: '08001',
  INVALID_AUTHORIZATION_SPECIFICATION: '28000',
  INVALID_PASSWORD: '28P01',
  INVALID_CATALOG_NAME: '3D000',
  UNDEFINED_OBJECT: '42704',
  DUPLICATE_PREPARED_STATEMENT: '42P05',
  DUPLICATE_DATABASE: '42P04',
  OBJECT_IN_USE: '55006',
  UNDEFINED_PREPARED_STATEMENT: '26000',
  FEATURE_NOT_SUPPORTED: '0A000',
  TOO_MANY_CONNECTIONS: '53300',
  PROGRAM_LIMIT_EXCEEDED: '54000',
  QUERY_CANCELED: '57014',
  ADMIN_SHUTDOWN: '57P01',
  CANNOT_CONNECT_NOW: '57P03',
  INTERNAL_ERROR: 'XX000',
  SYNTAX_ERROR: '42601',
  INSUFFICIENT_PRIVILEGE: '42501',
  TRANSACTION_RESOLUTION_UNKNOWN: '08007',
  READ_ONLY_SQL_TRANSACTION: '25006',
} as const;

export type Severity = 'ERROR' | 'FATAL' | 'PANIC' | 'WARNING' | 'NOTICE' | 'LOG' | 'INFO' | 'DEBUG';

export class PgError extends Error {
  constructor(readonly severity: Severity, readonly code: string, message: string, readonly detail?: string, readonly hint?: string) {
    super(message);
  }
}

/** An error pointing at a character of the query (1-based), like Postgres's syntax errors. */
export class PositionedError extends PgError {
  constructor(code: string, message: string, readonly position: number) {
    super('ERROR', code, message);
  }
}
