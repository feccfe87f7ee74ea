"""Fine-tuning: supervised chat/API-calling data, knowledge distillation, the API-calling task."""
