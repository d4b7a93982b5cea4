//! The single engine and the queue in front of it. The model runs on the thread that calls
//! [`run_engine`]; HTTP handlers hand it jobs through a bounded channel and read the text back
//! from a channel of their own. A handler that goes away (client disconnected) closes its
//! channel, which stops the generation at the next token, or before it starts.

use std::sync::Arc;
use std::time::Instant;

use flash_moe_engine::backend::Backend;
use flash_moe_engine::engine::logprobs::TokenLogprob;
use flash_moe_engine::engine::session::{Completion, GenerationRequest, Session, TextSink};
use flash_moe_engine::model::Model;
use flash_moe_engine::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Text pieces buffered between the engine and a handler.
const EVENT_BUFFER: usize = 256;

/// What the engine sends back for one job.
#[derive(Debug)]
pub enum EngineEvent {
    Text(String),
    Logprob(TokenLogprob),
    Done(Completion),
    Failed(String),
}

/// One request waiting for the engine.
pub struct Job {
    pub request: GenerationRequest,
    pub events: mpsc::Sender<EngineEvent>,
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// The handlers' side of the queue.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues `request`; its text arrives on the returned receiver.
    pub fn submit(&self, request: GenerationRequest) -> Result<mpsc::Receiver<EngineEvent>, SubmitError> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        match self.jobs.try_send(Job { request, events }) {
            Ok(()) => {
                self.metrics.waiting_changed(1);
                Ok(receiver)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::QueueFull(self.capacity)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// The engine's side of the queue.
pub struct JobQueue {
    jobs: mpsc::Receiver<Job>,
}

/// A queue holding at most `capacity` waiting requests.
pub fn job_queue(capacity: usize, metrics: Arc<Metrics>) -> (EngineHandle, JobQueue) {
    let (jobs, receiver) = mpsc::channel(capacity.max(1));
    (
        EngineHandle {
            jobs,
            capacity,
            metrics,
        },
        JobQueue { jobs: receiver },
    )
}

struct ChannelSink<'a> {
    events: &'a mpsc::Sender<EngineEvent>,
}

impl TextSink for ChannelSink<'_> {
    fn text(&mut self, piece: &str) -> bool {
        self.events.blocking_send(EngineEvent::Text(piece.to_string())).is_ok()
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    fn logprob(&mut self, logprob: TokenLogprob) -> bool {
        self.events.blocking_send(EngineEvent::Logprob(logprob)).is_ok()
    }
}

/// Runs jobs one after another until every handle is dropped.
pub fn run_engine<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    session: &mut Session<B>,
    mut queue: JobQueue,
    metrics: &Metrics,
) {
    while let Some(job) = queue.jobs.blocking_recv() {
        metrics.waiting_changed(-1);
        if job.events.is_closed() {
            metrics.record_cancelled_in_queue();
            continue;
        }
        metrics.running_changed(1);
        let start = Instant::now();
        let mut sink = ChannelSink { events: &job.events };
        let event = match session.generate(model, tokenizer, &job.request, &mut sink) {
            Ok(done) => {
                metrics.record_completion(&done, start.elapsed());
                EngineEvent::Done(done)
            }
            Err(e) => {
                tracing::warn!("generation failed: {e}");
                EngineEvent::Failed(e.to_string())
            }
        };
        // The handler may be gone already; nothing to do then.
        let _ = job.events.blocking_send(event);
        metrics.set_vram_cache(model.backend().expert_cache_stats());
        metrics.running_changed(-1);
    }
}
