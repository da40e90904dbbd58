"""cxr_train: fine-tune VGG16, ResNet50 and InceptionV3 on chest X-rays (needs the train extra)."""
