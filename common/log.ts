import { pino, type Logger } from 'pino';

export type { Logger };

/** Structured JSON logs on stdout (or a file descriptor chosen by the caller). */
export function createLogger(service: string, fields: Record<string, unknown> = {}): Logger {
  return pino({
    base: { service, pid: process.pid, ...fields },
    level: process.env.MG_LOG_LEVEL ?? 'info',
    timestamp: pino.stdTimeFunctions.isoTime,
  });
}
